"""Every hook a milterd plugin can implement, with its contract.

A plugin implements only the hooks it needs, and each implementation takes only the
arguments it needs (pluggy's opt-in arguments): ``def eom(self, ctx)`` is as valid as
``def eom(self, ctx, event, message)``. Mark implementations with :data:`milterd.hookimpl`.

Stage hooks are called once per plugin, in pipeline order, by the core itself (not by
pluggy's call loop): each call is guarded (``timeout``, ``on_error``) and attributed to its
plugin. A stage hook returns ``None`` to continue or a :class:`milterd.Verdict`.

Lifecycle of one connection::

    negotiate (core) -> connect -> helo* -> { envfrom -> envrcpt+ -> data -> header*
        -> eoh -> body* -> (eom -> finalize -> outcome | abort) }* -> close

``*`` may repeat or be absent; a connection may carry several messages, and ``abort``
replaces the rest of a message that ends before end of message: the MTA abandons it, or a
verdict (a plugin's or a core limit's) rejects, tempfails or discards it at an earlier
stage. Every message therefore ends with exactly one of ``eom`` (then ``finalize`` and
``outcome``) or ``abort``. Changes may be recorded from
``envfrom`` up to ``finalize``; the core applies them once, after ``finalize``.

Negotiation: a stage that no enabled plugin hooks is still needed by the core for
connect/helo/envfrom/envrcpt (envelope, logging), which are then requested with no reply
(``SMFIP_NR_*``: the MTA does not wait for us). data, header, eoh and body are not
requested at all (``SMFIP_NO*``) when nobody needs them; the headers and the body are also
requested when a plugin's ``eom``/``finalize``/``outcome`` takes the ``message`` argument
(the body not when its class says ``reads_body = False``; ``message.body()`` is then
empty, in the harness too).

Accept means "this plugin is done": at ``envfrom`` and later none of the plugin's hooks
for that message run any more (``finalize`` included), except ``outcome``, ``abort`` and
``close``; at ``envrcpt`` it concerns that recipient only; at ``connect`` and ``helo`` it
only skips the plugin's ``helo`` calls of that session (each message is new).

Observer hooks (``outcome``, ``abort``, ``close``) return None; a returned Verdict is
ignored, anything else is a ``bad-return`` failure (logged and counted, shown in the
harness's ``errors``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from pydantic import BaseModel

    from milterd.actions import Verdict
    from milterd.context import Context, Services
    from milterd.events import (
        Abort,
        Body,
        Close,
        Connect,
        Data,
        EnvFrom,
        EnvRcpt,
        Eoh,
        Eom,
        Header,
        Helo,
    )
    from milterd.spool import Message

PROJECT = "milterd"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

#: Stage hooks in the order the MTA drives them. ``finalize`` is ours, not the MTA's.
STAGES: tuple[str, ...] = (
    "connect",
    "helo",
    "envfrom",
    "envrcpt",
    "data",
    "header",
    "eoh",
    "body",
    "eom",
    "finalize",
    "outcome",
    "abort",
    "close",
)
#: Lifecycle hooks: called once per configuration generation, not per message.
LIFECYCLE: tuple[str, ...] = (
    "config_schema",
    "startup",
    "worker_start",
    "worker_ready",
    "shutdown",
    "commands",
)
#: Stages at which a plugin may record changes (a message exists and is not over).
CHANGE_STAGES = frozenset(
    ("envfrom", "envrcpt", "data", "header", "eoh", "body", "eom", "finalize")
)


# --- lifecycle ------------------------------------------------------------------------------


@hookspec(firstresult=True)
def config_schema() -> type[BaseModel] | None:
    """Declare the typed schema of this plugin's config section ``[plugins.NAME]``.

    When it fires: once per configuration load (start-up, ``config check``, SIGHUP), before
    :func:`startup`, only for enabled plugins.

    Returns: a pydantic model class (subclass :class:`milterd.PluginConfig` to forbid unknown
    keys), or None for a plugin without settings of its own. The core keys ``enabled``,
    ``order``, ``on_error``, ``timeout`` and ``isolation`` are handled by the core and never
    reach the model. Unknown keys and wrong types are configuration errors naming the file,
    section and key.

    Changes: none (no message exists). Negotiation: not applicable.
    Since: 0.1.
    """


@hookspec
def startup(config: Any, services: Services) -> None:
    """Prepare a new configuration generation: compile rules, load keys, check paths.

    When it fires: once per plugin instance, after the whole config validated, in pipeline
    order; again on a fresh instance at every successful reload (SIGHUP). Where depends on
    the plugin's ``prefork`` attribute:

    * ``prefork = True``: at start-up it runs **once, in the supervisor, before the workers
      fork**; every worker inherits what it built (copy-on-write), and a worker restarted
      after a crash inherits it too. So it must open nothing that cannot be shared between
      processes: no database connections, sockets, threads or open files — open those in
      :func:`worker_start`. At reload it runs in the supervisor (a failure there refuses
      the new config once, for all workers) and then in each worker, which build their
      new generation themselves.
    * ``prefork = False`` (the default, safe for any plugin): it runs in each worker after
      the fork, as if in a single process.

    In the harness and ``milterd check`` (one process) it simply runs, before
    :func:`worker_start`.

    Arguments:
        config: this plugin's validated config (an instance of the model from
            :func:`config_schema`, or None).
        services: shared services: ``services.resolver`` (the one DNS resolver),
            ``services.settings`` (the validated ``[milterd]`` section),
            ``services.logger`` (the plugin's own, ``milterd.NAME``, as ``ctx.log``),
            ``services.dry_run``: True in a dry run (``milterd check``,
            ``Harness(dry_run=True)``): compute everything, change no persistent state,
            create no files, send nothing (DNS lookups are fine). Open what you
            read read-only and only if it exists; skip writes, learning and sending (log
            at INFO ``"dry run: would ..."``). Also ``ctx.dry_run`` at every hook. The
            daemon never runs dry.

    Returns: nothing. An exception here refuses the configuration: at start-up the daemon
    does not start, at reload the old configuration stays in force.

    Changes: none. Negotiation: not applicable. Since: 0.1 (``prefork``: 0.2).
    """


@hookspec
def worker_start(services: Services) -> None:
    """Open this process's own state: database connections, sockets, threads.

    When it fires: in every process that handles mail, after :func:`startup` of the same
    generation and before its first connection: in each worker right after the fork (and
    for each new generation a worker builds at reload), once in the harness and in
    ``milterd check``. Also, to find a configuration every worker would refuse before any
    worker gets it, in a throwaway process that handles no mail and then calls
    :func:`shutdown`: a child of the supervisor at start and at every reload, and
    ``milterd config check``; there the environment variable ``MILTERD_WORKER`` is
    ``check`` (in a worker it is the worker's index), so start nothing meant to run once
    per daemon (a pruner, a report sender: worker ``0``'s job). Never in the supervisor
    itself. Random state needs nothing here: Python reseeds ``random`` in a forked child,
    and ``secrets``/``os.urandom`` are per call.

    Arguments:
        services: as for :func:`startup`. In a dry run (``services.dry_run``: ``milterd
            check``) open no connection that writes, create no files, start no thread
            that stores or sends.

    Returns: nothing. An exception refuses the generation, like one from
    :func:`startup`: in the supervisor's check, the daemon does not start (exit status 2)
    or the reload is refused (the old configuration stays); in a worker that nevertheless
    fails (a store gone since the check), a new worker exits (the supervisor restarts it,
    within its restart limit) and a reload keeps the old generation in that worker.

    Changes: none. Negotiation: not applicable. Since: 0.2.
    """


@hookspec
def worker_ready(services: Services) -> None:
    """The generation is accepted in this process: hand it to what outlives generations.

    When it fires: after every plugin's :func:`worker_start` of the generation succeeded
    in this process, in pipeline order, before the generation takes its first
    connection: in each worker at start and for each generation a reload builds, once
    in the harness and in ``milterd check``. Never in the throwaway check process, nor
    for a generation a later plugin's ``startup`` or ``worker_start`` refused. So this,
    not :func:`worker_start`, is where a plugin hands its settings to process-wide state
    (a sender or a pool the generations share): done in ``worker_start``, a refused
    reload would have put them in place until its :func:`shutdown` took them back.

    Arguments:
        services: as for :func:`worker_start`.

    Returns: nothing. Exceptions are logged and ignored: the generation is accepted.
    Changes: none. Negotiation: not applicable. Since: 0.1.
    """


@hookspec
def shutdown() -> None:
    """Release what :func:`startup` and :func:`worker_start` opened.

    When it fires: in each process where :func:`worker_start` ran, when it stops (at a
    worker's exit, for every generation no session holds: one a session cut by the drain
    still uses is left to the exit, since its hooks may still be running), and for the
    old generation after a reload once its last connection has closed; also, for the
    plugins already started, when a later plugin's ``startup`` or ``worker_start`` refuses
    the generation in that process (a refused reload leaks nothing). Not in the
    supervisor, which never handles mail.

    Returns: nothing. Exceptions are logged and ignored.
    Changes: none. Negotiation: not applicable. Since: 0.1.
    """


@hookspec
def commands(subparsers: Any) -> None:
    """Add subcommands to the ``milterd`` command line (``milterd dkim keygen ...``).

    When it fires: once per ``milterd`` invocation, for every *installed* plugin (enabled or
    not; one that fails to import is skipped with a warning), before arguments are parsed.

    Arguments:
        subparsers: the ``argparse`` sub-parsers object of ``milterd``. Add a parser and set
            ``fn`` to a callable taking the parsed ``argparse.Namespace`` and returning the
            exit status; ``args.config`` is the ``-c`` path. Load the config yourself with
            ``milterd.load_config`` if the command needs it, and
            ``milterd.make_resolver(config)`` for DNS through the daemon's ``[dns]``.

    Returns: nothing. Changes: none. Negotiation: not applicable. Since: 0.1.
    """


# --- stages ---------------------------------------------------------------------------------


@hookspec
def connect(ctx: Context, event: Connect) -> Verdict | None:
    """The SMTP client connected.

    When it fires: once per connection, first (xxfi_connect).
    Arguments: ``event.client`` (hostname, family, address, port), ``event.macros``.
    Returns: None to continue; a Reject/TempFail refuses the whole session; Discard
    discards every message of the session (the MTAs take no DISCARD here: the core answers
    it at each MAIL FROM, before any plugin's ``envfrom``; the plugins get ``abort``);
    Accept: this plugin is not called at HELO (message stages still call it; ``close``
    always does).
    Changes: may not be recorded (no message yet).
    Negotiation: unhooked by every plugin → requested with SMFIP_NR_CONN (no reply).
    Since: 0.1.
    """


@hookspec
def helo(ctx: Context, event: Helo) -> Verdict | None:
    """The client said HELO/EHLO (may fire more than once per connection).

    Arguments: ``event.name``, the HELO argument as given. Also in ``ctx.connection.helo``.
    Returns: None, or a verdict for the session (as :func:`connect`).
    Changes: may not be recorded.
    Negotiation: unhooked → SMFIP_NR_HELO. Since: 0.1.
    """


@hookspec
def envfrom(ctx: Context, event: EnvFrom) -> Verdict | None:
    """MAIL FROM: a new message begins.

    Arguments: ``event.sender`` (without brackets, ``""`` for the null sender),
    ``event.params`` (ESMTP parameters, upper-case names), ``event.macros`` (Postfix sends
    ``{auth_authen}`` here).
    Returns: None, or a verdict for the whole message.
    Changes: may be recorded.
    Negotiation: unhooked → SMFIP_NR_MAIL. Since: 0.1.
    """


@hookspec
def envrcpt(ctx: Context, event: EnvRcpt) -> Verdict | None:
    """RCPT TO, once per recipient.

    Arguments: ``event.recipient``, ``event.params``, ``event.macros``.
    Returns: None, or a verdict for *this recipient only*: Reject answers 5xx to that RCPT
    and the others go on; the recipient is not in ``ctx.message.recipients``. Except
    Discard, which discards the whole message (both MTAs do so; the plugins get
    ``abort``), and Quarantine, which holds the whole message (only a message can be
    held) unless that recipient is refused.
    Changes: may be recorded.
    Negotiation: unhooked → SMFIP_NR_RCPT. Since: 0.1.
    """


@hookspec
def data(ctx: Context, event: Data) -> Verdict | None:
    """DATA: the envelope is complete, content follows.

    Returns: None, or a verdict for the whole message (before its content is sent).
    Changes: may be recorded.
    Negotiation: unhooked → SMFIP_NODATA (not sent at all). Since: 0.1.
    """


@hookspec
def header(ctx: Context, event: Header) -> Verdict | None:
    """One header field, in order.

    Arguments: ``event.name``, ``event.value`` (decoded, invalid UTF-8 as surrogate
    escapes), ``event.raw`` (exact bytes). Every field so far is in ``ctx.message.headers``.
    Returns: None, or a verdict for the whole message. The MTA waits for a reply to every
    field while any plugin hooks this stage: prefer reading ``message.headers`` at
    :func:`eom`.
    Changes: may be recorded.
    Negotiation: unhooked and nobody reads the message → SMFIP_NOHDRS. Since: 0.1.
    """


@hookspec
def eoh(ctx: Context, event: Eoh) -> Verdict | None:
    """End of the header block.

    Returns: None, or a verdict for the whole message (before the body is sent).
    Changes: may be recorded.
    Negotiation: unhooked → SMFIP_NOEOH. Since: 0.1.
    """


@hookspec
def body(ctx: Context, event: Body) -> Verdict | None:
    """One chunk of the body (at most 64 KiB; CRLF line ends as sent by the MTA).

    The core spools every chunk once; a plugin that needs the whole body should take
    ``message`` at :func:`eom` instead of buffering chunks itself.
    Returns: None, or a verdict for the whole message.
    Changes: may be recorded.
    Negotiation: unhooked and no eom/finalize takes ``message`` → SMFIP_NOBODY. Since: 0.1.
    """


@hookspec
def eom(ctx: Context, event: Eom, message: Message) -> Verdict | None:
    """End of message: the whole message is available. Decide, record results and changes.

    When it fires: once per message, in pipeline order; plugins later in the order see the
    results, symbols and changes of earlier ones on the ledger (``ctx.results``,
    ``ctx.symbols``, ``ctx.changes``).
    Arguments: ``message``, the message as received (headers with raw bytes, spooled body).
    Returns: None, or a verdict. Unlike other stages every plugin runs even after a reject
    verdict, so that archiving and reporting plugins see the outcome.
    Changes: may be recorded. They are merged with all others and applied after
    :func:`finalize`.
    Negotiation: always requested. Since: 0.1.
    """


@hookspec
def finalize(ctx: Context, message: Message) -> Verdict | None:
    """The message as it will be delivered: for signing, sealing and archiving.

    When it fires: after every plugin's :func:`eom`, when the merged verdict delivers the
    message (continue, accept, quarantine); not for a plugin that returned Accept for
    this message. Order: pipeline order, except that a plugin that may change the message
    (``actions`` naming a change other than ``quarantine``, or no ``actions`` declared)
    listed after a signer (``signs = True``: DKIM, ARC) runs just before the first signer,
    unless it declares ``after`` a plugin that stays in place (a signer, or one that
    follows it): so signatures cover every change and their fields are on top whatever
    order the config lists them in. Plugins that change nothing keep their place (an
    archive listed after the signers sees the signed message).
    ``message`` has every change recorded so far applied, including earlier ``finalize``
    plugins' changes.
    ``ctx.verdict`` is the merged verdict so far (None: continue; or accept, quarantine).
    Returns: None, or a verdict (a TempFail here, e.g. an archive that cannot write, holds
    the message back).
    Changes: may be recorded. Authentication fields (DKIM-Signature, ARC-*,
    Authentication-Results, Received-SPF) go on top (signatures cover what follows); other
    added fields go to the bottom, as at any stage.
    Negotiation: not an MTA stage; body requested if ``message`` is taken. Since: 0.1.
    """


@hookspec
def outcome(ctx: Context, verdict: Verdict | None, message: Message) -> None:
    """The message's fate is sealed: observe it (archive rejected mail, report, learn).

    When it fires: once per message that reached end of message, after the final merge,
    whatever the verdict, in pipeline order; before the bridge answers the MTA. Not for a
    message that ended earlier for the plugins (they had ``abort`` instead), even when the
    MTA still sends its end of message (a core limit reached at a stage sent without
    reply).
    Arguments: ``verdict``, the final verdict (None: delivered unchanged in kind, i.e.
    continue); ``message``, the message as it will be delivered when it is delivered, as
    received otherwise; ``ctx.results``, ``ctx.symbols``, ``ctx.score``, ``ctx.verdict`` final.
    Also for a plugin that returned Accept earlier.
    Returns: None (a Verdict is ignored; anything else is a ``bad-return`` failure);
    exceptions are logged and counted, ``on_error`` does not apply (the verdict is
    already decided).
    Changes: may not be recorded.
    Negotiation: body requested if ``message`` is taken (unless ``reads_body = False``).
    Since: 0.1.
    """


@hookspec
def abort(ctx: Context, event: Abort) -> None:
    """The current message ended before end of message.

    When it fires: once per message that does not reach ``eom``, for every plugin (also the
    one whose verdict ended it, and plugins that returned Accept): the MTA abandoned it
    (RSET, a new MAIL, lost client, another filter's reject), or a verdict before end of
    message (a plugin's Reject/TempFail/Discard at envfrom, data, header, eoh or body, or
    a core limit) ended it. Not for a single refused recipient. Every plugin is called
    whatever an earlier plugin's ``abort`` did (failed, timed out, returned a verdict),
    while the stage's ``command_timeout`` lasts. Release per-message resources. The
    ledger of the message is discarded.
    Returns: None (a Verdict is ignored; anything else is a ``bad-return`` failure, logged).
    Changes: may not be recorded.
    Negotiation: always sent by the MTA; costs nothing when unhooked. Since: 0.1.
    """


@hookspec
def close(ctx: Context, event: Close) -> None:
    """The connection ends. Always the last event of a connection, even after errors.

    Every plugin is called, one that accepted too, whatever an earlier plugin's ``close``
    did (failed, timed out, returned a verdict), while the stage's ``command_timeout``
    lasts. Release per-connection resources.

    Returns: None (a Verdict is ignored; anything else is a ``bad-return`` failure, logged).
    Changes: may not be recorded.
    Negotiation: always sent by the MTA. Since: 0.1.
    """
