"""The embedded default model and how it is run and judged.

* :mod:`~diffattn.pipelines.shapes`: procedural training and evaluation data (moving, bouncing
  shapes with captions).
* :mod:`~diffattn.pipelines.embedded`: ``EmbeddedVideoPipeline`` (a small pixel-space Wan
  transformer and text encoder; the weights ship in ``embedded_model/``) and its loader.
* :mod:`~diffattn.pipelines.shape_detector` and :mod:`~diffattn.pipelines.eval_embedded`: the
  held-out evaluation behind ``diffattn eval-embedded`` (and its optional probes).

Training is ``scripts/train_embedded_model.py``; options that were tried and not shipped live in
``research/embedded/`` (outside the package). Background: ``docs/embedded-model.md``.

Example:
    >>> from diffattn.pipelines.embedded import load_embedded_pipeline
    >>> type(load_embedded_pipeline()).__name__
    'EmbeddedVideoPipeline'
"""
