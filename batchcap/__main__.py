"""``python -m batchcap`` runs the same CLI as the ``batchcap`` command."""

from batchcap.cli import main

if __name__ == "__main__":
    main()
