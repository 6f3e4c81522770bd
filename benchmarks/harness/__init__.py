"""The harness of the benchmarks and tests: everything around the plugin that is not the plugin.

- ``models``: random Qwen2 models of the shapes in ``shapes/`` (nothing downloaded);
- ``tasks``: the digit-reversal task, its prompts and its one score;
- ``actor``: AReaL's FSDP actor on CPU in one process, and one trainer step;
- ``streams``: stale batches shaped like the inference engine's (one ``StaleStream`` protocol);
- ``variants``: the one registry of the compared π_prox methods;
- ``loop``: the interleaved in-process run loop and its typed ``StepRecord``;
- ``launch``: launching a real run and watching it (benchmarks and pipeline tests);
- ``train``: ``python -m benchmarks.harness.train``, the plugin's entry point with these stand-ins.
"""
