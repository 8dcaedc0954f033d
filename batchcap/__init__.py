"""batchcap: caption image collections with an Xception encoder and an LSTM beam search.

The Python API (``docs/api.md``)::

    import batchcap

    captioner = batchcap.load_model()  # the packaged model; or a path
    for result in captioner.caption(["photo.jpg", pil_image, uint8_array]):
        print(result.status, result.caption)

    batchcap.run(["./photos"], "captions.parquet")  # what `batchcap run` does, resumable
    batchcap.run_on_ray(["/shared/photos"], "/shared/captions.parquet", tasks=16)  # `run --ray`, batchcap[ray]

The names below are imported on first use, so ``import batchcap`` stays light (no torch).
"""

from __future__ import annotations

from batchcap.version import __version__

TYPE_CHECKING = False  # typing's own flag, without importing typing (a few ms) on every ``import batchcap``

#: What ``batchcap`` exports from :mod:`batchcap.pipeline.api`, loaded on first access.
_API = ("load_model", "run", "ImageCaptioner", "CaptionResult", "RunResult")

#: What ``batchcap`` exports from :mod:`batchcap.pipeline.ray_engine` (which imports Ray only when it runs).
_RAY_API = ("run_on_ray", "RayRunResult")

__all__ = [
    "CaptionResult",
    "ImageCaptioner",
    "RayRunResult",
    "RunResult",
    "__version__",
    "load_model",
    "run",
    "run_on_ray",
]

if TYPE_CHECKING:
    from typing import Any

    from batchcap.pipeline.api import CaptionResult, ImageCaptioner, RunResult, load_model, run
    from batchcap.pipeline.ray_engine import RayRunResult, run_on_ray


def __getattr__(name: str) -> Any:
    if name in _API:
        from batchcap.pipeline import api  # torch and the model code load here, not at ``import batchcap``

        value = getattr(api, name)
        globals()[name] = value
        return value
    if name in _RAY_API:
        from batchcap.pipeline import ray_engine  # the API and torch load here; Ray itself only when a run starts

        value = getattr(ray_engine, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'batchcap' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_API, *_RAY_API})
