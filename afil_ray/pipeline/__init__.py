"""``afil-ray reproduce``: the paper's pipeline as cached stages (``pipeline``), the stage cache (``stages``),
which arms its tables hold (``plan``) and the tables themselves (``reports``; the paper's rates in
``paper_rates.json``)."""
