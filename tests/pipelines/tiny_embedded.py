"""A tiny randomly initialised embedded pipeline (2 layers) for fast tests; no files needed."""

from diffattn.pipelines.embedded import EmbeddedModelConfig, EmbeddedVideoPipeline, build_components

TINY = EmbeddedModelConfig(num_layers=2, num_attention_heads=2, attention_head_dim=24, ffn_dim=64)


def tiny_embedded_pipeline(seed: int = 0) -> EmbeddedVideoPipeline:
    pipe = EmbeddedVideoPipeline(**build_components(TINY, seed=seed))
    pipe.set_progress_bar_config(disable=True)
    return pipe
