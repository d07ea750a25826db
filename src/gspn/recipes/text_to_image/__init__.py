"""Text-to-image (``gspn generate``): one high-resolution generation with a GSPN adapter, as a job of the runner.

* :class:`GenerateConfig` + :func:`run` — the job (its field names are the command's flags);
* :class:`TextToImageRecipe` — the same with an already-built pipeline
  (``gspn.training_utils.run(TextToImageRecipe(config, pipe=...))``).

The pipeline pieces (:func:`~gspn.integrations.generate.load_pipeline`,
:func:`~gspn.integrations.generate.prepare_pipeline`, :func:`~gspn.integrations.generate.generate`) are
library functions of :mod:`gspn.integrations.generate`. Needs the ``gspn[diffusers]`` extra to run;
importing this package does not import diffusers.
"""

from .job import GenerateConfig, TextToImageRecipe, pipeline_dtype, run

__all__ = ["GenerateConfig", "TextToImageRecipe", "pipeline_dtype", "run"]
