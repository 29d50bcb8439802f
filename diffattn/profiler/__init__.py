"""The profiler: dense vs preset runs of one pipeline call, same seed; speedups, attention share,
density, the Amdahl bound and fidelity (PSNR/SSIM), as a :class:`ProfileReport`.

Example:
    >>> import diffattn
    >>> from diffattn.pipelines.embedded import load_embedded_pipeline
    >>> pipe = load_embedded_pipeline()
    >>> report = diffattn.profile(pipe, "radial", warmup=0, prompt="a red circle moves left", num_frames=3,
    ...                           height=32, width=32, num_inference_steps=2)
    >>> [path.name for path in report.save("profile.json")]
    ['profile.json', 'profile.md', 'profile.png']
"""

from .metrics import amdahl_bound, predicted_speedup, psnr, ssim
from .report import ProfileReport
from .runner import profile

__all__ = ["ProfileReport", "amdahl_bound", "predicted_speedup", "profile", "psnr", "ssim"]
