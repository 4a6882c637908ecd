"""The benchmark: moe_gemm against ``torch._grouped_mm`` on the expert GEMMs of real MoE models, on a Hopper GPU with
the kernels built::

    python -m moe_gemm.bench [--quick] [--backward | --decode | --layer] [--models NAME ...] [--json PATH] [--plot PATH]

Modules, each importing only those above it:

- ``timing``: medians with L2 flushed, functions timed in turn, host time per call, CUDA graphs;
- ``suite``: the models of ``moe_gemm/shapes.json``, routed row counts, FLOPs and bytes, the device's ceilings and
  the floor;
- ``report``: the tables, progress, geometric means, JSON and plot;
- ``forward``, ``backward``, ``decode``, ``layer``: one benchmark each, with a ``run(args, suite)`` (``layer`` runs
  the configs of ``layer_configs.json`` beside it, ``--configs NAME ...`` picks some);
- ``__main__``: the command line.

Nothing else in moe_gemm imports this package. The pure parts (suite, floors, tables, summaries) run on CPU.
"""
