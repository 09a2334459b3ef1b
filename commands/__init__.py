"""The commands and reports of mixgrpo (``mixgrpo.commands``): the command line, comparisons and their
reports, export, sampling, model cards and side-by-side evaluations. They drive the engine
(``mixgrpo.core``); the engine never imports them."""
