"""``milterd bayes ...``: train the scoring plugin's classifier and show its counts."""

from __future__ import annotations

import argparse
import mailbox
import sys
from typing import Any

from milterd import ConfigError, load_config

from . import bayes as bayes_mod
from .config import BayesConfig, ScoringConfig
from .content import extract
from .rules import MessageData

__all__ = ["add_commands", "learn_bytes"]

MAX_PARSE = 2 << 20


def add_commands(subparsers: Any) -> None:
    p = subparsers.add_parser("bayes", help="scoring plugin: Bayesian classifier")
    sub = p.add_subparsers(dest="bayes_command", required=True)
    t = sub.add_parser("train", help="learn spam and ham from mbox files or Maildir folders")
    what = "mbox file, Maildir folder or directory of messages (repeatable)"
    t.add_argument("--spam", action="append", default=[], metavar="PATH", help=what)
    t.add_argument("--ham", action="append", default=[], metavar="PATH")
    t.add_argument("--path", help="SQLite file (overrides [plugins.scoring.bayes] path)")
    t.add_argument("--redis-url", help="use Redis at this URL instead of the config")
    t.set_defaults(fn=cmd_train)
    s = sub.add_parser("stats", help="messages learned")
    s.add_argument("--path")
    s.add_argument("--redis-url")
    s.set_defaults(fn=cmd_stats)


def _settings(args: argparse.Namespace) -> BayesConfig:
    scoring = ScoringConfig.model_validate({})
    try:
        scoring = load_config(args.config).plugin_model("scoring", ScoringConfig)
    except ConfigError:
        if args.path is None and args.redis_url is None:
            raise  # one line and exit status 2 (milterd's main)
    b = scoring.bayes
    if args.path:
        b = b.model_copy(update={"backend": "sqlite", "path": args.path})
    if args.redis_url:
        b = b.model_copy(update={"backend": "redis", "redis_url": args.redis_url})
    return b


def tokens_of(raw: bytes, max_tokens: int) -> tuple[list[str], str | None]:
    """The classifier's tokens for one message, and its Message-ID: the same as the daemon
    learns from the same bytes (header fields split as an MTA sends them, values decoded
    as the core decodes them: UTF-8, raw 8-bit text included)."""
    # Imported here: milterd.testing imports the core and with it prometheus_client, which
    # must not be imported before `milterd run` has set its multiprocess directory (this
    # module is imported for every command, to list the plugin's subcommands).
    from milterd.testing import split_message

    raw = raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    split, body = split_message(raw)
    fields = [
        (name, value.decode("utf-8", "surrogateescape").removeprefix(" "))
        for name, value in split
    ]
    headers = MessageData.header_list(fields)
    # The message as the plugin reads it in the daemon: the fields as the MTA sent them,
    # a blank line, the body (where a line is no field, the header block ends there).
    head = b"".join(name.encode("ascii", "surrogateescape") + b":" + value + b"\r\n"
                    for name, value in split)  # fmt: skip
    content = extract(head + b"\r\n" + body, MAX_PARSE)
    mid = next((v for n, v in fields if n.lower() == "message-id"), None)
    return bayes_mod.tokenize(headers, content, max_tokens), mid


def learn_bytes(classifier: bayes_mod.Classifier, raw: bytes, spam: bool, max_tokens: int) -> bool:
    tokens, mid = tokens_of(raw, max_tokens)
    return classifier.learn(tokens, spam, bayes_mod.digest_of(mid, tokens))


def _redis_errors() -> tuple[type[BaseException], ...]:
    try:
        import redis
    except ImportError:
        return ()
    return (redis.exceptions.RedisError,)


def cmd_train(args: argparse.Namespace) -> int:
    if not args.spam and not args.ham:
        print("milterd bayes train: give --spam and/or --ham", file=sys.stderr)
        return 2
    b = _settings(args)
    try:
        return _train(args, b)
    except _redis_errors() as e:  # a Redis server down or refusing: one line, not a traceback
        print(f"milterd bayes train: Redis at {b.redis_url}: {e}", file=sys.stderr)
        return 2


def _train(args: argparse.Namespace, b: BayesConfig) -> int:
    store = bayes_mod.open_store(b.backend, b.path, b.redis_url, b.redis_prefix, 10.0)
    clf = bayes_mod.Classifier(store, b.min_spam, b.min_ham)
    failed = False
    try:
        for label, paths in (("spam", args.spam), ("ham", args.ham)):
            learned = seen = errors = 0
            for source in (s for path in paths for s in bayes_mod.sources(path)):
                try:
                    for n, raw in enumerate(bayes_mod.iter_messages(source), 1):
                        seen += 1
                        try:
                            learned += learn_bytes(clf, raw, label == "spam", b.max_tokens)
                        except _redis_errors():
                            raise
                        except Exception as e:  # this message only: the rest still learn
                            errors += 1
                            print(f"milterd bayes train: {source}: message {n}: {e}",
                                  file=sys.stderr)  # fmt: skip
                            failed = True
                except (OSError, mailbox.Error, ValueError) as e:
                    # Said, and the other paths still learned: one bad path in a list
                    # does not leave the rest untrained. Exit 1 at the end.
                    print(f"milterd bayes train: {source}: {e}", file=sys.stderr)
                    failed = True
            if paths:
                print(
                    f"{label}: {learned} learned, {seen - learned - errors} already known"
                    + (f", {errors} failed" if errors else "")
                )
        nspam, nham = store.totals()
        print(f"total: {nspam} spam, {nham} ham")
    finally:
        store.close()
    return 1 if failed else 0


def cmd_stats(args: argparse.Namespace) -> int:
    b = _settings(args)
    try:
        # Read-only: a mistyped --path (or a store the daemon has not created yet) is
        # reported, not created empty (as root, where the daemon could not write it).
        store = bayes_mod.open_store_readonly(
            b.backend, b.path, b.redis_url, b.redis_prefix, 10.0
        )
        if store is None:
            print(f"milterd bayes stats: no Bayes database at {b.path}", file=sys.stderr)
            return 1
        try:
            nspam, nham = store.totals()
        finally:
            store.close()
    except _redis_errors() as e:
        print(f"milterd bayes stats: Redis at {b.redis_url}: {e}", file=sys.stderr)
        return 2
    ready = nspam >= b.min_spam and nham >= b.min_ham
    print(f"spam {nspam}, ham {nham}; classifying: {'yes' if ready else 'no'} "
          f"(needs {b.min_spam} spam and {b.min_ham} ham)")  # fmt: skip
    return 0
