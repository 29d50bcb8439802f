"""``diffattn``: the command line. Argument parsing only; the work is done by the package layers.

    diffattn presets [--family wan]
    diffattn mask --preset radial --family wan --out radial.png
    diffattn generate --preset radial --prompt "a red ball" --output out.mp4
    diffattn profile --preset radial --num-frames 33 --report profile.json
    diffattn bench --device cpu --shapes small      (diffattn.profiler.bench_kernels)
    torchrun --nproc-per-node 2 -m diffattn.cli generate ... --ulysses-degree 2   (context parallelism)

Bad input (a bad flag, or a :class:`~diffattn.errors.UserError` from the layers below) prints
``error: `` and the whole message (every reason, one per line) on stderr and exits with code 2.
Any other exception is a bug: it keeps its traceback (exit code 1).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .errors import UserError, error_message

GENERATE_HELP = """\
Generate a video with sparse attention from a preset.

Without --model, the default is diffattn's embedded model: a small pixel-space Wan transformer
(WanTransformer3DModel, patch 8x8 px) with a word-level tokenizer and a tiny text encoder, trained
by diffattn on procedural videos of moving shapes and shipped in the package (offline, ~8 MB).
It understands captions like "a red circle moves left and a blue square moves down" (colours:
red green blue yellow purple cyan; shapes: circle square triangle; directions: left right up
down); default 17 frames at 64x64 px, any frame count, sizes multiples of 8. --model may name a
local diffusers pipeline folder (loaded with DiffusionPipeline.from_pretrained, no remote code);
hub ids are refused because nothing is downloaded."""

PROFILE_HELP = """\
Run the same call dense (the family's 'dense' preset) and with --preset, with the same seed, after
--warmup untimed rounds; print a table and write --report PATH (.json, plus .md and .png beside it).

Reports: end-to-end speedup, attention share of the dense run, attention speedup, density
(overall and per layer), the Amdahl bound, the predicted end-to-end speedup, and PSNR/SSIM of the
preset's frames against the dense frames (PSNR "inf" in JSON when identical). The default model is
the embedded model, as for generate (see diffattn generate --help)."""


EVAL_HELP = """\
Generate one video per held-out caption (a seed stream training never uses) with the embedded
model, optionally under a sparsity preset, and score it with the synthetic-data detector (colour
masks -> shape centroids): adherence = share of caption checks passed (each named shape present,
of the right kind, starting in the named direction); motion_deviation_px = mean distance of the
tracked centroids from a constant-velocity-with-bounces fit. Targets: adherence >= 0.8,
deviation <= 2 px at the base length (17 frames, 64x64)."""


class _Parser(argparse.ArgumentParser):
    """argparse with diffattn's error convention: one ``error: ...`` line and exit code 2."""

    def error(self, message: str):  # noqa: D401 - argparse API
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="diffattn", description="Sparse attention for diffusion video models.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    p = sub.add_parser("presets", help="list the sparsity presets per model family, with densities")
    p.add_argument("--family", default=None, help="only this model family")

    p = sub.add_parser("mask", help="render a preset's block layout to a PNG and print its density")
    p.add_argument("--preset", required=True, help="preset name or YAML path")
    p.add_argument("--family", default="wan", help="model family (default wan)")
    p.add_argument("--frames", type=int, default=None, help="latent frames (default: the family's default grid)")
    p.add_argument("--height", type=int, default=None, help="latent tokens per column")
    p.add_argument("--width", type=int, default=None, help="latent tokens per row")
    p.add_argument("--out", required=True, help="PNG path")

    sub.add_parser("bench", help="kernel benchmark: block-sparse vs SDPA and FlexAttention (see diffattn bench --help)",
                   add_help=False)

    p = sub.add_parser("generate", help="generate a video (default model: the embedded shapes model)",
                       description=GENERATE_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_run_arguments(p)
    p.add_argument("--fps", type=int, default=16)
    p.add_argument("--output", required=True, help=".mp4 (imageio-ffmpeg) or .gif, written atomically")
    _add_steering_arguments(p)

    p = sub.add_parser("profile", help="dense vs preset with the same seed: speedups, density, Amdahl bound, PSNR/SSIM",
                       description=PROFILE_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_run_arguments(p)
    p.add_argument("--report", default=None,
                   help="JSON report path; PATH.md (the table) and PATH.png (chart) are written beside it")
    p.add_argument("--warmup", type=int, default=1, help="untimed warm-up rounds, dense + preset each (default 1)")
    p.add_argument("--repeats", type=int, default=1, help="timed rounds; the report holds medians (default 1)")

    p = sub.add_parser("eval-embedded", help="score the embedded model on held-out captions (adherence, motion)",
                       description=EVAL_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--report", required=True, help="JSON report path; a PNG contact sheet is written beside it")
    p.add_argument("--model", default=None, help="folder saved by scripts/train_embedded_model.py (default: shipped)")
    p.add_argument("--preset", default="dense", help="sparsity preset (wan family) or YAML path (default dense)")
    p.add_argument("--num-captions", type=int, default=32)
    p.add_argument("--num-frames", type=int, default=17)
    p.add_argument("--size", type=int, default=64, help="height = width in pixels (multiple of 8)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's, 25)")
    p.add_argument("--guidance-scale", type=float, default=None,
                   help="default: the model's; 7.0 for the embedded model "
                   "(the best of 3, 5 and 7 on the tuning captions)")
    p.add_argument("--seed", type=int, default=0, help="noise seed of the first video (video i uses seed + i)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--probes", action="store_true",
                   help="also run the diagnostics on the tuning captions: one-step denoising profile and "
                        "caption-word sensitivity (about 3x the evaluation's model calls)")
    _add_train_lora_parser(sub)
    return parser


# --- train-lora (diffattn.training) ------------------------------------------------------------
TRAIN_LORA_HELP = """\
LoRA (or full) fine-tuning with the preset's sparse attention in forward and backward, e.g. for
length extension: the default trains the embedded model at 65 frames (4x its base length) on
procedural clips. --data FOLDER trains on captioned videos (metadata.jsonl or metadata.csv);
--model a local text-to-video pipeline folder (Wan, LTX-Video, HunyuanVideo, CogVideoX, Mochi).
Output: OUTPUT/pytorch_lora_weights.safetensors (diffusers format: pipe.load_lora_weights(OUTPUT),
diffattn generate --lora OUTPUT), checkpoints in OUTPUT/checkpoint (--resume), training.json.
Several processes: accelerate launch -m diffattn.cli train-lora ... (data parallel)."""


def _add_train_lora_parser(sub) -> None:
    p = sub.add_parser("train-lora", help="LoRA fine-tuning with sparse attention (length extension)",
                       description=TRAIN_LORA_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", required=True, help="output folder (LoRA, checkpoint/, training.json)")
    p.add_argument("--model", default=None, help="local diffusers pipeline folder (default: the embedded model)")
    p.add_argument("--data", default=None, help="folder of videos + metadata.jsonl/csv (default: procedural clips)")
    p.add_argument("--preset", default="radial", help="sparsity preset or YAML, active in training (default radial)")
    p.add_argument("--num-frames", type=int, default=65, help="training clip length (default 65)")
    p.add_argument("--height", type=int, default=None, help="pixels (default: the model's)")
    p.add_argument("--width", type=int, default=None, help="pixels (default: the model's)")
    p.add_argument("--steps", type=int, default=200, help="optimizer steps (default 200)")
    p.add_argument("--stop-after", type=int, default=None, help="stop after this many of --steps (then --resume)")
    p.add_argument("--batch-size", type=int, default=1, help="clips per step and process (default 1)")
    p.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation micro-steps (default 1)")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default 1e-3 LoRA, 1e-4 full)")
    p.add_argument("--warmup", type=int, default=10, help="linear warm-up steps (default 10)")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank (default 16)")
    p.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default: the rank)")
    p.add_argument("--targets", default="attention", choices=("attention", "attention+ffn"))
    p.add_argument("--full-finetune", action="store_true", help="train every transformer weight instead of LoRA")
    p.add_argument("--mixed-precision", default="no", choices=("no", "bf16", "fp16"))
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--timestep-shift", type=float, default=None,
                   help="training noise-level shift (default: 3; CogVideoX 1 = uniform timesteps)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-every", type=int, default=50, help="checkpoint every N steps (default 50)")
    p.add_argument("--resume", action="store_true", help="continue from OUTPUT/checkpoint")
    p.add_argument("--validate-every", type=int, default=0, help="validation video every K steps (0: never)")
    p.add_argument("--validation-prompt", default="a red circle moves right")
    p.add_argument("--validation-steps", type=int, default=10, help="denoising steps of a validation video")
    p.add_argument("--cache-dir", default=None, help="latent/text cache (default DATA/.diffattn-cache)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")


def cmd_train_lora(args) -> int:
    from .training import TrainLoraOptions, train_lora

    options = TrainLoraOptions(**{k: v for k, v in vars(args).items() if k != "command"})
    train_lora(options, log=lambda line: print(line, file=sys.stderr))
    return 0


def _add_run_arguments(p: argparse.ArgumentParser) -> None:
    """The model, prompt and size flags of generate and profile (names follow the pipeline call)."""
    p.add_argument("--model", default=None,
                   help="local diffusers pipeline folder; default: the embedded model")
    p.add_argument("--preset", default="dense", help="preset name of the model's family or a YAML path (default dense)")
    p.add_argument("--prompt", default="", help='text prompt (default model: e.g. "a red circle moves left")')
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--num-frames", type=int, default=None,
                   help="frames; Wan VAE models need 1 + 4k (default model: any, 17)")
    p.add_argument("--height", type=int, default=None, help="pixels; multiple of 8 for the default model (64)")
    p.add_argument("--width", type=int, default=None, help="pixels; multiple of 8 for the default model (64)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default model: 25)")
    p.add_argument("--guidance-scale", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    p.add_argument("--cpu-offload", action="store_true", help="diffusers model CPU offload (needs an accelerator)")
    p.add_argument("--lora", default=None, help="LoRA weights: .safetensors file or train-lora output folder")
    p.add_argument("--ulysses-degree", type=int, default=1,
                   help="diffusers context parallelism (Ulysses) over N processes: run under "
                        "`torchrun --nproc-per-node N -m diffattn.cli ...` (Wan, LTX-Video, FLUX; default 1)")


def _add_steering_arguments(p: argparse.ArgumentParser) -> None:
    """generate's steering flags (diffattn.steer); each repeatable."""
    g = p.add_argument_group("steering (text attention; see README 'Steering')")
    g.add_argument("--weight", action="append", default=[], metavar="WORD=FACTOR",
                   help="multiply the attention to WORD's tokens by FACTOR (e.g. red=2.0)")
    g.add_argument("--region", action="append", default=[], metavar="PHRASE=x0,y0,x1,y1",
                   help="favour PHRASE inside the box (fractions of the frame), suppress it outside")
    g.add_argument("--exclude", action="append", default=[], metavar="PHRASE=x0,y0,x1,y1",
                   help="suppress PHRASE inside the box")
    g.add_argument("--capture", action="append", default=[], metavar="WORD",
                   help="write WORD's attention map next to the video (OUTPUT_STEM.WORD.png and a heat-map video)")
    g.add_argument("--steer-strength", type=float, default=3.0,
                   help="region/exclusion logit bias (default 3; inf: hard)")


def _steering_options(args) -> dict:
    return dict(weights=tuple(args.weight), regions=tuple(args.region), excludes=tuple(args.exclude),
                captures=tuple(args.capture), steer_strength=args.steer_strength)


def _run_options(args) -> dict:
    """The shared flags as keyword arguments of RunOptions and its subclasses."""
    return dict(
        model=args.model, preset=args.preset, prompt=args.prompt, negative_prompt=args.negative_prompt,
        num_frames=args.num_frames, height=args.height, width=args.width, steps=args.steps,
        guidance_scale=args.guidance_scale, seed=args.seed, device=args.device, dtype=args.dtype,
        cpu_offload=args.cpu_offload, lora=args.lora, ulysses_degree=args.ulysses_degree,
    )


def cmd_presets(args) -> int:
    from .adapters import family_default_grid
    from .processors.presets import families, list_presets, preset_density

    names = families()
    if args.family is not None and args.family not in names:
        return _fail(f"unknown model family {args.family!r}; available: {', '.join(names)}")
    for family in [args.family] if args.family else names:
        grid = family_default_grid(family)
        text = f" + {grid.text_tokens} text ({grid.text_position})" if grid.text_tokens else ""
        print(f"{family}  (density at {grid.frames}x{grid.height}x{grid.width}{text} tokens)")
        for preset in list_presets(family):
            density = preset_density(preset.config, grid)
            print(f"  {preset.name:<18} {density:7.4f}  {preset.description}")
    return 0


def cmd_mask(args) -> int:
    from .adapters import ADAPTERS, family_default_grid
    from .patterns import VideoGrid
    from .patterns.picture import save_layout_png
    from .processors.presets import families, load_preset, preset_layout

    if args.family not in families() or args.family not in {adapter.family for adapter in ADAPTERS}:
        return _fail(f"unknown model family {args.family!r}; available: {', '.join(families())}")
    if Path(args.out).suffix.lower() != ".png":
        return _fail(f"--out must be a .png path; got {args.out!r}")
    preset = load_preset(args.preset, family=args.family)
    default = family_default_grid(args.family)
    grid = VideoGrid(
        args.frames if args.frames is not None else default.frames,
        args.height if args.height is not None else default.height,
        args.width if args.width is not None else default.width,
        default.text_tokens, default.text_position,
    )
    layout = preset_layout(preset.config, grid)
    path = save_layout_png(layout, args.out, grid)
    text = f" + {grid.text_tokens} text" if grid.text_tokens else ""
    print(f"{preset.family or args.family}/{preset.name}: {grid.frames}x{grid.height}x{grid.width}{text} tokens, "
          f"density {layout.density:.4f} (tile density {layout.tile_density:.4f}) -> {path}")
    return 0


def cmd_bench(argv: list[str]) -> int:
    from .profiler.bench_kernels import main as bench_main

    return bench_main(argv, prog="diffattn bench")


def cmd_generate(args) -> int:
    from .runs import GenerateOptions, generate, is_main_rank

    options = GenerateOptions(output=args.output, fps=args.fps, **_run_options(args), **_steering_options(args))
    result = generate(options)
    if not is_main_rank():
        return 0
    density = "n/a" if result.density is None else f"{result.density:.4f}"
    grid = "" if result.grid is None else f" at {result.grid.frames}x{result.grid.height}x{result.grid.width} tokens"
    print(f"wrote {result.path}: {result.num_frames} frames {result.height}x{result.width} in {result.seconds:.1f} s, "
          f"preset {result.family}/{result.preset}, layout density {density}{grid}, "
          f"{result.sparse_calls} sparse attention calls")
    if result.maps:
        print("wrote attention maps: " + ", ".join(str(path) for path in result.maps))
    return 0


def cmd_profile(args) -> int:
    from .profiler.command import ProfileOptions, run_profile
    from .runs import is_main_rank, process_rank

    options = ProfileOptions(report=args.report, warmup=args.warmup, repeats=args.repeats, **_run_options(args))
    report, paths = run_profile(options, log=lambda line: print(line, file=sys.stderr))
    if options.ulysses_degree > 1:  # each rank times its own attention calls
        print(f"rank {process_rank()}/{options.ulysses_degree}: attention "
              f"{report.dense_attention_seconds:.3f} s dense, {report.sparse_attention_seconds:.3f} s sparse",
              file=sys.stderr)
    if not is_main_rank():
        return 0
    print(report.to_markdown(), end="")
    if paths:
        print(f"wrote {', '.join(str(path) for path in paths)}")
    return 0


def cmd_eval_embedded(args) -> int:
    from .pipelines.eval_embedded import run_evaluation

    report, paths = run_evaluation(
        report_path=args.report, model=args.model, preset=args.preset, num_captions=args.num_captions,
        num_frames=args.num_frames, size=args.size, num_inference_steps=args.steps,
        guidance_scale=args.guidance_scale, seed=args.seed, batch_size=args.batch_size,
        log=lambda line: print(line, file=sys.stderr), probes=args.probes,
    )
    by = report["adherence_by_check"]
    print(f"adherence {report['adherence']:.3f} (present {by['present']:.3f}, shape {by['shape']:.3f}, "
          f"direction {by['direction']:.3f}; objects fully right {report['objects_fully_correct']:.3f})")
    print(f"motion deviation {report['motion_deviation_px']:.2f} px "
          f"(median {report['motion_deviation_px_median']:.2f}; "
          f"detector on ground truth: {report['ground_truth']['motion_deviation_px']:.2f} px)")
    if args.probes:
        profile = report["denoising_profile"]
        print("one-step denoising of true clips, adherence by noise level: " + ", ".join(
            f"{sigma:g}: {value:.2f}" for sigma, value in zip(profile["sigmas"], profile["adherence"])))
        probe = report["caption_sensitivity"]
        print("caption words read at sigma " + ", ".join(f"{sigma:g}" for sigma in probe["sigmas"])
              + ": estimate change " + "; ".join(f"{kind} " + "/".join(f"{v:.4f}" for v in values)
                                                 for kind, values in probe["mean_abs_change"].items())
              + "; direction following " + "/".join(f"{v:.2f}" for v in probe["direction_following_px_per_frame"])
              + " px/frame")
    print(f"targets (adherence >= {report['targets']['adherence']}, deviation <= "
          f"{report['targets']['motion_deviation_px']} px): {'met' if report['targets_met'] else 'NOT met'}")
    print("wrote " + ", ".join(paths))
    return 0


def _dispatch(argv: list[str]) -> int:
    if argv and argv[0] == "bench":  # the benchmark parses its own flags (diffattn bench --help)
        return cmd_bench(argv[1:])
    args = build_parser().parse_args(argv)
    if args.command == "presets":
        return cmd_presets(args)
    if args.command == "mask":
        return cmd_mask(args)
    if args.command == "profile":
        return cmd_profile(args)
    if args.command == "eval-embedded":
        return cmd_eval_embedded(args)
    if args.command == "train-lora":
        return cmd_train_lora(args)
    return cmd_generate(args)


def main(argv: list[str] | None = None) -> int:
    """The ``diffattn`` console entry point; returns the exit code (0, or 2 for bad input).

    Only :class:`~diffattn.errors.UserError` becomes an ``error:`` message: a plain ValueError,
    OSError or anything else raised below is a bug and propagates with its traceback.

    Example:
        >>> main(["presets", "--family", "no-such-family"])  # prints "error: unknown model family ..." on stderr
        2
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return _dispatch(argv)
    except UserError as error:
        return _fail(error_message(error))
    except KeyboardInterrupt:
        return _fail("interrupted")


if __name__ == "__main__":
    sys.exit(main())
