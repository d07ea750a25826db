"""The recipes: each task is a config (a :class:`gspn.training_utils.RunConfig`) plus its maths, run by the
training kit's runner (:func:`gspn.training_utils.run`).

==========================  ===========================  ==========================================
package                     command                      what it does
==========================  ===========================  ==========================================
:mod:`.classification`      ``gspn train``, ``eval``     train / evaluate a classifier
:mod:`.diffusion`           ``gspn train-dit``,          train a class-conditional GSPN-DiT, sample
                            ``sample``,                  from it, encode a dataset to VAE latents
                            ``extract-latents``
:mod:`.unet_distillation`   ``gspn distill``             distil a GSPN-swapped diffusers UNet
:mod:`.encoder_distillation` ``gspn distill-encoder``    distil an attention ViT into a GSPN encoder
:mod:`.text_to_image`       ``gspn generate``            high-resolution text-to-image with an adapter
:mod:`.bench`               ``gspn bench``               one GSPN layer against attention
==========================  ===========================  ==========================================

Recipes import the kit and everything below it, never each other or the command package.
"""
