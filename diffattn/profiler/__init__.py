"""The profiler: dense vs preset runs of one pipeline call, same seed; speedups, attention share,
density, the Amdahl bound and fidelity (PSNR/SSIM), as a :class:`ProfileReport`.

Example:
    >>> import diffattn
    >>> report = diffattn.profile(pipe, "radial", prompt="a red ball", num_frames=33)
    >>> print(report.to_markdown())
    >>> report.save("profile.json")          # + profile.md, profile.png
"""

from .metrics import amdahl_bound, predicted_speedup, psnr, ssim
from .report import ProfileReport
from .runner import profile

__all__ = ["ProfileReport", "amdahl_bound", "predicted_speedup", "profile", "psnr", "ssim"]
