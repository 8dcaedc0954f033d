"""``batchcap info``: a model file's metadata, printed for people."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from batchcap.model.modelfile import DEFAULT_MODEL, CaptionModel
from batchcap.model.terms import model_terms


def terms_of(model: CaptionModel) -> dict:
    """:func:`batchcap.model.terms.model_terms` for a loaded model (the packaged one known by its path)."""
    path = getattr(model, "path", None)
    is_default = path is not None and Path(path).resolve() == DEFAULT_MODEL.resolve()
    return model_terms(model.metadata(), is_default_model=is_default)


def _stage(identity: str, training: dict[str, Any]) -> str:
    config = training.get("config") or {}
    objective = "self-critical (CIDEr-D)" if config.get("self_critical") else "teacher forcing"
    parts = [objective]
    pretrain = training.get("pretrain") or {}
    if pretrain:
        parts[0] = (
            f"language model on {pretrain.get('captions', '?')} captions (held-out perplexity "
            f"{(pretrain.get('held_out_perplexity') or {}).get('after', '?')}), then {objective}"
        )
    if config.get("lr") is not None:
        parts.append(f"lr {config['lr']:g}")
    history = training.get("history") or []
    selected = training.get("epoch")
    if selected:
        parts.append(f"epoch {selected} selected")
        chosen: dict[str, Any] = next((h for h in history if h.get("epoch") == selected), {})
        val = chosen.get("val") or {}
        cider = val.get("CIDEr")
        each = [
            f"{name} {scores['CIDEr']:.3f}"
            for name, scores in (val.get("datasets") or {}).items()
            if isinstance(scores.get("CIDEr"), (int, float))
        ]
        if isinstance(cider, (int, float)):
            how = f" ({val.get('selected_by', 'selection')}: {'; '.join(each)})" if each else ""
            parts.append(f"val CIDEr-D {cider:.3f}{how}")
    return f"{identity}: {', '.join(parts)}"


def _data_line(data: dict[str, Any]) -> str:
    """One data set of a training record: its layout, where it was, its splits and its epoch weight."""
    splits = ", ".join(
        f"{name} {s.get('images', 0)} images" for name, s in (data.get("splits") or {}).items() if s.get("images")
    )
    name = f"{data['name']}: " if data.get("name") else ""
    weight = f" (weight {data['weight']:g})" if isinstance(data.get("weight"), (int, float)) else ""
    return f"{name}{data.get('format')} at {data.get('root')}: {splits}{weight}"


def lineage(identity: str, training: dict[str, Any]) -> list[str]:
    """Every training stage from the first start to this model, oldest first, one line each.

    Each model records its ``--init-model``'s identity and training record, so the chain
    can be read from the file alone; the model card names its stages the same way.
    """
    stages = []
    while training:
        stages.append(_stage(identity, training))
        start = training.get("init_model") or {}
        identity, training = start.get("identity", "?"), start.get("training") or {}
        if not start:
            break
    return stages[::-1]


def describe_model(model: CaptionModel, show_vocab: bool = False, console: Console | None = None) -> None:
    """Print encoder, preprocessing, decoder, vocabulary, training data and scores of ``model``."""
    console = console or Console()
    table = Table(title=f"{model.identity}  ({model.path})", show_header=False, title_justify="left")
    table.add_column("what", style="bold")
    table.add_column("value", overflow="fold")
    enc = model.encoder
    weights = (
        "embedded in the model file"
        if model.encoder_state is not None and not enc.finetuned
        else f"{enc.weights_file or '?'} (sha256 {enc.weights_sha256})"
        if enc.weights_sha256
        else f"timm pretrained ({enc.pretrained_tag})"
    )
    if enc.finetuned:
        weights += f", with the {enc.finetuned.replace('_', ' ')} fine-tuned and stored in the model file"
    flows = 1 + len(model.member_exit_flows())
    features = f"{enc.feature_dim}-d"
    if flows > 1:
        weights += f" once per decoder ({flows} exit flows on one shared trunk, each decoder reading its own)"
        features += f" per exit flow, {enc.feature_dim * flows}-d side by side"
    table.add_row("encoder", f"{enc.name}, {'spatial map' if enc.spatial else 'pooled'} features, {features}")
    table.add_row("encoder weights", weights)
    pre = model.preprocess
    table.add_row(
        "preprocessing",
        f"{pre.resize} to {pre.width}x{pre.height}, {pre.interpolation}, "
        f"crop_pct {pre.crop_pct}, mean {pre.mean}, std {pre.std}",
    )
    members = model.decoders()
    if len(members) > 1:
        rule = "mean log-probability" if model.combine == "logprob" else "mean probability"
        table.add_row(
            "ensemble",
            f"{len(members)} decoders in one beam search, combined by {rule}: "
            + ", ".join(m.identity for m in members),
        )
    for n, member in enumerate(members, 1):
        dec = member.config
        n_params = sum(t.numel() for t in member.state.values())
        table.add_row(
            "decoder" if len(members) == 1 else f"decoder {n}",
            f"LSTM x{dec.num_layers}, hidden {dec.hidden_dim}, embedding {dec.embed_dim}, "
            f"{'soft attention ' + str(dec.attention_dim) + '-d' if dec.attention else 'no attention'}"
            f", dropout {dec.dropout}, {n_params / 1e6:.2f} M parameters",
        )
    if model.decoder.styles:
        routed = model.neighbours is not None and model.neighbours.datasets is not None
        table.add_row(
            "caption styles",
            f"{', '.join(model.decoder.styles)} (--style); auto: "
            + (
                "each picture its nearest training pictures' style"
                if routed
                else f"{model.decoder.styles[0]} (no neighbours with datasets: calibrate the model)"
            ),
        )
    table.add_row("vocabulary", f"{len(model.vocab)} words (ids 0-3: <pad> <start> <end> <unk>)")
    table.add_row("max caption length", f"{model.max_caption_len} words")
    training = model.training
    if len(members) > 1:
        for n, member in enumerate(members, 1):
            stages = lineage(member.identity, member.training)
            table.add_row(f"lineage (decoder {n})", "\n".join(f"{k}. {stage}" for k, stage in enumerate(stages, 1)))
        training = members[0].training
    if training.get("averaged"):
        table.add_row("averaged from", ", ".join(f"{m['identity']} x {m['weight']:.2f}" for m in training["averaged"]))
        training = training["averaged"][0].get("training") or {}
    stages = lineage(model.identity, training)
    if len(stages) > 1 and len(members) == 1:
        table.add_row("lineage", "\n".join(f"{n}. {stage}" for n, stage in enumerate(stages, 1)))
    data = training.get("data") or {}
    if isinstance(data, list):  # several data sets trained on at once
        table.add_row("training data", "\n".join(_data_line(each) for each in data))
    elif isinstance(data, dict) and "splits" in data:
        table.add_row("training data", _data_line(data))
    elif data:
        table.add_row("training data", str(data))
    if training.get("epoch"):
        table.add_row("selected epoch", str(training["epoch"]))
    metrics = {k: v for k, v in model.metrics.items() if isinstance(v, (int, float))}
    if metrics:
        where = model.metrics.get("selected_on", "")
        table.add_row(f"scores ({where})", ", ".join(f"{k} {v:.3f}" for k, v in metrics.items()))
    ending = (
        f"{len(model.unendable_words)} words may not end a caption (learnt from "
        f"{model.ending_rule.get('learnt_from', 'training captions')})"
        if model.unendable_words is not None
        else "built-in closed-class words (none stored)"
    )
    if model.unendable_pairs is not None:
        shown = ", ".join(" ".join(pair) for pair in model.unendable_pairs[:5])
        more = ", ..." if len(model.unendable_pairs) > 5 else ""
        ending += f"; {len(model.unendable_pairs)} word pairs may not end one ({shown}{more})"
    else:
        ending += "; no word pairs stored"
    table.add_row("ending rule", ending)
    repeat = (
        f"{len(model.repeatable_words)} words may follow themselves ({', '.join(model.repeatable_words) or 'none'}; "
        f"learnt from {model.repeat_rule.get('learnt_from', 'training captions')})"
        if model.repeatable_words is not None
        else "no word may follow itself (no exceptions stored)"
    )
    table.add_row("repeat rule", repeat)
    if model.familiarity is not None:
        table.add_row("familiarity", model.familiarity.note or f"{model.familiarity.images} training pictures")
    if model.neighbours is not None:
        nb = model.neighbours
        captions = sum(len(c) for c in nb.captions)
        table.add_row(
            "neighbours",
            f"{len(nb.captions)} training pictures with {captions} captions; the {nb.k} nearest are read by the "
            "confidence and by consensus reranking (--consensus-weight)",
        )
    if model.calibration is not None:
        auroc = model.calibration.report.get("auroc", {})
        first = next(iter(auroc.items()), None)
        table.add_row(
            "confidence",
            f"calibrated on {model.calibration.report.get('fitted_on', '?')}"
            + (f"; AUROC {first[1]} ({first[0]})" if first else "")
            + _calibrated_search(model.calibration.report.get("beam", {})),
        )
    terms = terms_of(model)
    table.add_row(
        "terms of use",
        f"{terms['terms']}\n"
        + "\n".join(f"- {s['source']}: {s['terms']}" for s in terms["sources"])
        + f"\n(read from {terms['basis']}; batchcap's code: {terms['code']})",
    )
    console.print(table)
    if show_vocab:
        console.print(" ".join(model.vocab.words))


def _calibrated_search(beam: dict[str, Any]) -> str:
    """The search settings a calibrator was fitted for, as a sentence; other settings are uncalibrated."""
    if "beam_size" not in beam:
        return ""
    weight = beam.get("consensus_weight", 0.0)
    reranking = f"consensus weight {weight:g}" if weight else "no reranking"
    return (
        f"; fitted for beam {beam['beam_size']}, length penalty {beam.get('length_penalty', 0.0):g}, {reranking} "
        "(other search settings give an uncalibrated confidence)"
    )
