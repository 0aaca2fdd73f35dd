"""The trainer's command line (``unet-train``, ``train_hvd.py``): train, then export for the engines.

Training (``unet.training``) writes ``model.keras`` and ``model.json``; the files the inference engines
read are written at the end by the export of ``unet.inference``, which the loop is handed here, so
training never imports the stages after it.
"""
import sys

from unet.cli import command
from unet.training import train


def export_for_engines(folder: str, model, meta: dict, formats) -> dict:
    """The end-of-training export: ``formats`` beside model.keras, the engines timed, model.json updated."""
    # imported here, not at the top: TensorFlow must not load before the rank's threads are set
    from unet.inference.export import export_after_training
    return export_after_training(folder, model, meta, formats)


@command("train_hvd.py")
def main(argv: list[str] | None = None) -> int:
    return train.main(argv, export=export_for_engines)


if __name__ == "__main__":
    sys.exit(main())
