"""Model artifacts: the store, ``edgephi quantize``, ``edgephi fetch``, the quality gate, ``edgephi models``.

Command line (``--store DIR`` or ``$EDGEPHI_STORE_DIR``, default ``/var/lib/edgephi/models``)::

    edgephi quantize --model SRC --name NAME [--profile default|16gb|12gb|24gb|rtn] [--use]
                     [--bits 4] [--group-size 128] [--sym/--no-sym] [--export-format auto_gptq|auto_round]
                     [--iters N] [--nsamples N] [--seqlen N] [--batch-size N] [--gradient-accumulate-steps N]
                     [--low-gpu-mem-usage] [--calibration FILE ...] [--no-local-corpus] [--device DEV]
                     [--reference BF16_DIR] [--no-gate] [--max-ppl-ratio X] [--min-top1 Y] [--gate-tokens N]
    edgephi fetch SOURCE --sha256 DIGEST [--name NAME] [--use] [--retries N] [--timeout S]
    edgephi verify [NAME|PATH] [--reference BF16_DIR [--max-ppl-ratio X] [--min-top1 Y] [--no-record]] [--json]
    edgephi models list [--json] | use NAME [--no-verify] | remove NAME

``quantize`` (:mod:`.build`): refuses, before any work, configurations the installed vLLM cannot serve (GPTQ other
than symmetric 4/8-bit; anything but symmetric 4-bit on the CPU backend; group sizes other than -1/32/64/128 or
not dividing every quantized layer's in-features; a quantized ``lm_head``), a source that is already quantized,
a taken name or too little disk; then runs auto-round (:func:`.autoround.quantize`, progress bar with ETA per
block) into a temp directory of the store, the quality gate, writes the manifest and promotes with a rename.
Every knob of the run is one frozen :class:`.autoround.AutoRoundParams` (profile → flags → auto-round →
manifest). Profiles follow auto-round's documented cost for a 14B model: ``default``/``16gb``
(low_gpu_mem_usage, ~11 GB VRAM), ``12gb`` (low_gpu_mem_usage + batch 1 + gradient accumulation 8, ~7 GB),
``24gb`` (auto-round's defaults, ~22 GB), ``rtn`` (iters 0). Calibration is offline (:mod:`.corpus`):
``--calibration`` files first, topped up by the train split of the standard-library docstrings. SOURCE may be
``hf://ORG/REPO@COMMIT`` (the only hub access).

``fetch`` (:mod:`.fetch`): an http(s) ``.tar``/``.tar.gz`` (resumable, retried, disk-checked, sha256-pinned), a
local archive, a local directory or ``hf://ORG/REPO@COMMIT`` (pinned by the sha256 of ``manifest.json``);
safe extraction, every file verified, promotion with a rename. It never switches ``current`` unless ``--use``.

``verify`` (:mod:`.gate`): the files against the manifest; with ``--reference`` also the quality gate (perplexity
ratio and next-token top-1 agreement against the 16-bit source on held-out text), recorded in the manifest
(which changes the artifact digest; the daemon reports the new one after its next start).

Modules, each depending only on those listed before it: :mod:`.manifest` (format, digests, verification),
:mod:`.store` (layout, staging, ``current``), :mod:`.fetch`, :mod:`.corpus` (calibration and held-out text),
:mod:`.checkpoint` (safetensors headers), :mod:`.autoround` (the parameters and the run), :mod:`.gate`,
:mod:`.build` (the ``quantize`` pipeline). The subcommands and their exit codes: :mod:`edgephi.cli.models`.
Importing this package imports neither torch nor vLLM.
"""
