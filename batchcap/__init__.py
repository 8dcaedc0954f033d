"""batchcap: caption image collections with an Xception encoder and an LSTM beam search."""

__version__ = "0.1.0"
