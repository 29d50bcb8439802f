"""Agent attention numbers on the CPU (issue 27): writes benchmarks/results/agent-<part>-cpu-<date>.json/.md.

Parts:

* ``unet``: AgentSD on a tiny-config SD 1.5 UNet (SD 1.5's block layout and head count, small
  channels, random weights) at 64 x 64 latents: end-to-end denoising time dense vs ``agent`` (and
  ``tome``), the time of the self-attention layers (``attn1`` module calls, projections, merging
  and unmerging included) at each resolution level, the attention share, the attention speedup,
  the end-to-end speedup those predict (Amdahl) and the bound at the op's pair density.

The ``embedded`` part (agents pooled over the video grid on the embedded Wan model, PSNR/SSIM vs
dense) measured an extension that did not ship; its result stays in
``benchmarks/results/agent-embedded-cpu-2026-12-07.*`` and its code in commit 039ef00.

Run: ``PYTHONPATH=. python scripts/bench_agent.py --part unet`` (minutes on 2 busy cores).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import diffattn  # noqa: E402
from diffattn.processors.agent import AgentSD, level_grid  # noqa: E402
from diffattn.profiler.metrics import amdahl_bound, predicted_speedup, psnr  # noqa: E402

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
TEXT_TOKENS, TEXT_DIM = 77, 64


def tiny_sd15_pipeline(seed: int = 0):
    """SD 1.5's UNet layout (4 levels, 2 layers per block, 8 heads, cross-attention on the first
    three levels) at channels (64, 128, 256, 256) instead of (320, 640, 1280, 1280); no VAE work
    (latents out)."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(64, 128, 256, 256), attention_head_dim=8, cross_attention_dim=TEXT_DIM,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, norm_num_groups=32,
    )
    vae = AutoencoderKL(block_out_channels=(8, 8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, norm_num_groups=2)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=None, tokenizer=None, unet=unet,
                                   scheduler=EulerDiscreteScheduler(steps_offset=1), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


#: The UNet part's clock: this process's CPU time, on one thread. The development machine's 2
#: cores are shared with other jobs (load average 10+), so wall time measures the neighbours;
#: single-threaded CPU time measures the work.
CLOCK = time.process_time


class LayerTimer:
    """CPU time of every ``attn1`` module call, by the number of tokens it saw."""

    def __init__(self, unet: torch.nn.Module) -> None:
        self.seconds: dict[int, float] = defaultdict(float)
        self.calls: dict[int, int] = defaultdict(int)
        self._start: dict[int, float] = {}
        self.handles = []
        for name, module in unet.named_modules():
            if name.endswith("attn1"):
                self.handles.append(module.register_forward_pre_hook(self._before))
                self.handles.append(module.register_forward_hook(self._after))

    def _before(self, module, args) -> None:
        self._start[id(module)] = CLOCK()

    def _after(self, module, args, output) -> None:
        tokens = args[0].shape[1]
        self.seconds[tokens] += CLOCK() - self._start.pop(id(module))
        self.calls[tokens] += 1

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def bench_unet(args) -> dict:
    """Dense vs AgentSD's two phases: agents (the paper's steps 0-19, ``AgentSD(steps={})``) and
    plain ToMe (steps 20 on: the ``tome`` preset, the same settings). Each is timed as one UNet
    forward (a denoising step, batch 2 as with CFG) and, inside it, the 64 x 64 ``attn1`` layer
    calls; the minimum over ``args.repeats`` interleaved rounds, in single-threaded CPU time
    (:data:`CLOCK`). Paper-schedule rows add up the per-step times of the two phases."""
    pipe = tiny_sd15_pipeline()
    unet = pipe.unet
    generator = torch.Generator().manual_seed(0)
    inputs = dict(sample=torch.randn(2, 4, 64, 64, generator=generator), timestep=torch.tensor(500),
                  encoder_hidden_states=torch.randn(2, TEXT_TOKENS, TEXT_DIM, generator=generator))
    configs = {"dense": None, "agent phase (steps 0-19)": AgentSD(steps={}),
               "tome phase (steps 20+)": diffattn.processors.presets.load_preset("tome", family="sd").config}
    paper = diffattn.processors.presets.load_preset("agent", family="sd").config.pattern
    assert paper.settings(step=20) == configs["tome phase (steps 20+)"].pattern.settings(step=20)
    runs: dict[str, list[dict]] = defaultdict(list)
    outputs = {}
    with torch.inference_mode():
        for round_index in range(args.repeats + 1):  # round 0 warms up
            for name, config in configs.items():
                diffattn.remove(pipe)
                if config is not None:
                    diffattn.apply(pipe, config)
                timer = LayerTimer(unet)
                start = CLOCK()
                outputs[name] = unet(**inputs).sample
                seconds = CLOCK() - start
                timer.remove()
                if round_index:
                    runs[name].append(dict(seconds=seconds, layer_seconds=dict(timer.seconds),
                                           calls=dict(timer.calls)))
                print(f"{name} round {round_index}: {seconds:.1f} s", flush=True)
    diffattn.remove(pipe)

    tokens_top = 64 * 64
    dense = runs["dense"]
    e2e_dense = min(r["seconds"] for r in dense)
    layer_dense = min(r["layer_seconds"][tokens_top] for r in dense)
    share = layer_dense / e2e_dense
    rows, per_step = [], {}
    for name, config in list(configs.items())[1:]:
        e2e = min(r["seconds"] for r in runs[name])
        layer = min(r["layer_seconds"][tokens_top] for r in runs[name])
        pattern = config if isinstance(config, AgentSD) else config.pattern
        density = pattern.pair_density(diffattn.VideoGrid(1, 64, 64))
        per_step[name] = (e2e, layer, density)
        rows.append(_row(name, e2e_dense, e2e, layer_dense, layer, share, density))
        rows[-1]["output_psnr_vs_dense_random_weights"] = psnr(_unit(outputs["dense"]), _unit(outputs[name]))
    (agent_e2e, agent_layer, agent_density), (tome_e2e, tome_layer, tome_density) = per_step.values()
    for total in (25, 50):
        e2e = 20 * agent_e2e + (total - 20) * tome_e2e
        layer = 20 * agent_layer + (total - 20) * tome_layer
        density = (20 * agent_density + (total - 20) * tome_density) / total
        rows.append(_row(f"agent preset, {total} steps (sum of the phases' step times)", e2e_dense * total, e2e,
                         layer_dense * total, layer, share, density))
    levels = {f"{level_grid(diffattn.VideoGrid(1, 64, 64), n)[1].height}^2": dict(
        calls_per_step=dense[0]["calls"][n], dense_s=min(r["layer_seconds"][n] for r in dense))
        for n in sorted(dense[0]["layer_seconds"], reverse=True)}
    return dict(part="unet", repeats=args.repeats, rows=rows, dense_attn1_by_level=levels,
                all_attn1_share=sum(v["dense_s"] for v in levels.values()) / e2e_dense,
                model="tiny-config SD 1.5 UNet: block_out_channels (64, 128, 256, 256), 2 layers per block, 8 heads, "
                      "cross_attention_dim 64, random weights; 64x64 latents (512 px), one UNet forward at batch 2 "
                      "(a CFG step), float32, one thread, CPU time (process_time)")


def _row(name: str, e2e_dense: float, e2e: float, layer_dense: float, layer: float, share: float,
         density: float) -> dict:
    speedup = layer_dense / layer
    return dict(preset=name, e2e_dense_s=e2e_dense, e2e_s=e2e, e2e_speedup=e2e_dense / e2e,
                attn1_64x64_dense_s=layer_dense, attn1_64x64_s=layer, attention_speedup=speedup,
                attention_share=share, predicted_e2e=predicted_speedup(share, speedup), pair_density=density,
                amdahl_bound=amdahl_bound(share, density))


def _unit(latents: torch.Tensor) -> np.ndarray:
    """Latents scaled to [0, 1] together (for PSNR between two runs of random weights)."""
    x = latents.float().cpu().numpy()
    return np.clip((x + 4) / 8, 0, 1)


def markdown(result: dict) -> str:
    head = f"**Agent attention, {result['part']} (cpu, {result['date']})**\n\n"
    meta = (f"{result['machine']}; load average at start {result['load_average']}; "
            f"took {result['minutes']:.1f} min\n\n")
    if result["part"] == "unet":
        lines = [head + result["model"] + f"; minimum over {result['repeats']} interleaved rounds after a warm-up; "
                 "the 25- and 50-step rows add up the measured per-step times.\n\n" + meta,
                 "| preset | UNet step(s) dense -> preset | e2e speedup | attention share (64x64 attn1) "
                 "| attention speedup "
                 "| predicted e2e (Amdahl) | pair density | Amdahl bound |",
                 "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for r in result["rows"]:
            lines.append(f"| {r['preset']} | {r['e2e_dense_s']:.1f} s -> {r['e2e_s']:.1f} s | {r['e2e_speedup']:.2f}x "
                         f"| {100 * r['attention_share']:.1f} % | {r['attention_speedup']:.2f}x "
                         f"| {r['predicted_e2e']:.2f}x | {r['pair_density']:.3f} | {r['amdahl_bound']:.2f}x |")
        levels = result["dense_attn1_by_level"].items()
        lines.append("\nDense attn1 time by level: " + ", ".join(
            f"{k}: {v['dense_s']:.2f} s ({v['calls_per_step']} calls)" for k, v in levels)
            + f"; all attn1 layers: {100 * result['all_attn1_share']:.1f} % of the dense run")
        return "\n".join(lines) + "\n"
    raise ValueError(f"unknown part {result['part']!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("unet",), default="unet")
    parser.add_argument("--repeats", type=int, default=2, help="timed rounds (unet)")
    parser.add_argument("--date", default="2026-12-07")
    args = parser.parse_args()
    torch.set_num_threads(1)
    load = os.getloadavg()[0]
    start = time.perf_counter()
    result = bench_unet(args)
    result.update(date=args.date, device="cpu", machine=f"{platform.processor() or platform.machine()}, "
                  f"{os.cpu_count()} cores, torch {torch.__version__}", load_average=round(load, 1),
                  minutes=(time.perf_counter() - start) / 60)
    stem = RESULTS / f"agent-{args.part}-cpu-{args.date}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
