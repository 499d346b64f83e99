"""``ferry bench``: a load generator for OpenAI-compatible servers.

Modules: ``workload`` (what is sent and when), ``client`` (one timed streaming request), ``runner``
(closed- and open-loop load), ``metrics`` (percentiles, goodput), ``report`` (tables, JSON), ``plot``
(PNG), ``tokens`` (optional tokenizer), ``command`` (the CLI), ``naive_server`` (the HF baseline).
Nothing here imports torch except ``naive_server`` when it loads a model.
"""
