"""Integrations of GSPN with other libraries.

* :mod:`gspn.integrations.diffusers`: GSPN in place of the self-attention of diffusers UNets
  (extra ``gspn[diffusers]``).
* :mod:`gspn.integrations.generate`: high-resolution text-to-image pipeline pieces (load, prepare for
  large sizes, generate with an optional low→high refinement), used by ``gspn generate``.

This layer imports :mod:`gspn.ops`, :mod:`gspn.nn` and :mod:`gspn.models` only; the optional
third-party libraries are imported by the submodules that need them.
"""
