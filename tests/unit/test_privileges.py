"""Dropping privileges after the socket is open (``user``/``group``): what the daemon made
as root before the drop must stay usable by the new user."""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

from milterd import daemon


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop privileges")
def test_the_metrics_directory_is_handed_to_the_user_the_daemon_drops_to(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The workers write their metric files there as that user; left to root (mode 0700)
    # every connection failed at negotiate and was tempfailed.
    path = tempfile.mkdtemp(prefix="milterd-metrics-test-")  # as _multiprocess_metrics does
    try:
        with open(os.path.join(path, "counter_1.db"), "wb"):  # one the supervisor made
            pass
        monkeypatch.setattr(daemon, "_metrics_dir", path)
        pid = os.fork()
        if pid == 0:  # the child drops privileges; the test process stays root
            code = 1
            try:
                daemon._drop_privileges("nobody", "nogroup")
                with open(os.path.join(path, "gauge_livesum_2.db"), "wb") as f:
                    f.write(b"x")
                os.unlink(os.path.join(path, "counter_1.db"))
                code = 0
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        import pwd

        assert os.stat(path).st_uid == pwd.getpwnam("nobody").pw_uid
    finally:
        shutil.rmtree(path, ignore_errors=True)
