"""Test infrastructure for milterd: real components on loopback only.

Modules:

* :mod:`tests.support.postfix`   -- a private, throw-away Postfix instance (:class:`PrivatePostfix`)
  and :func:`~tests.support.postfix.free_port`, used by every server here.
* :mod:`tests.support.sink`      -- an SMTP sink that records every message (:class:`SmtpSink`).
* :mod:`tests.support.dnsserver` -- an authoritative DNS server fed from a dict
  (:class:`ZoneServer`).
* :mod:`tests.support.smtp`      -- an SMTP client that reports instead of raising (:func:`send`).
* :mod:`tests.support.noop_milter` -- a tiny pymilter milter that adds one header at end of message.

Nothing here talks to anything but 127.0.0.1 / ::1.
"""
