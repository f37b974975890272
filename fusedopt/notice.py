"""A line on stderr while a first-use compile runs long, so that a first ``opt.step()``
that compiles for 5-30 s on a fresh machine (or after a torch upgrade) is not a silent hang.

Nothing is printed when the work ends within ``AFTER`` seconds (a warm cache: numba
loads a kernel in ~0.1 s, the host helper loads in milliseconds).  Otherwise one line
says what is compiling and how to do it ahead (``fusedopt warmup``), and a second line
how long it took.  Set ``FUSEDOPT_QUIET=1`` to print nothing; ``FUSEDOPT_NOTICE_AFTER``
changes the threshold (seconds).

Numba compiles a kernel per variant (rule, flags, dtypes), each 0.8-3 s: a step that
needs several would pass any per-kernel threshold unannounced.  So compiles that follow
each other within ``GAP`` seconds count as one burst, and the threshold applies to the
burst's compile time.  numba tells when it compiles (its ``numba:compile`` event; a
load from its disk cache sends none): ``install()`` listens for fusedopt's kernels.
"""
import atexit
import os
import sys
import threading
import time

AFTER = float(os.environ.get("FUSEDOPT_NOTICE_AFTER", "2"))
GAP = 0.5
HINT = "first use on this machine; `fusedopt warmup` does this ahead"


_silenced = [0]


def _quiet():
    return _silenced[0] or os.environ.get("FUSEDOPT_QUIET", "") not in ("", "0")


class silenced:
    """Within it nothing is announced (``fusedopt warmup`` reports its own progress)."""

    def __enter__(self):
        _silenced[0] += 1

    def __exit__(self, *exc):
        _silenced[0] -= 1
        return False


def _say(msg):
    if not _quiet():
        # sys.stderr looked up at print time: a redirected or captured stderr gets it
        print(f"fusedopt: {msg}", file=sys.stderr, flush=True)


class Notice:
    """Announces work that outlasts ``AFTER`` seconds: ``start(what)`` / ``end()`` around
    each piece (or ``with notice.slow(what):``); pieces that follow each other within
    ``gap`` seconds are one burst, announced once, and its total time said at its end."""

    def __init__(self, gap=0.0):
        self.gap = gap
        self._lock = threading.RLock()
        self._timer = self._done = None
        self._began = self._last_end = None
        self._spent = 0.0  # the burst's seconds of work so far
        self._printed = False
        self._what = ""
        self._depth = 0
        self.count = 0  # pieces of work begun (compiles, for numba)
        self.seconds = 0.0  # their CPU seconds, all bursts (the tests' profile reads it)
        self._began_cpu = 0.0

    def start(self, what):
        with self._lock:
            self._depth += 1
            if self._depth > 1:  # nested in a piece already timed
                return
            self.count += 1
            now = time.perf_counter()
            if self._done is not None:
                self._done.cancel()
                self._done = None
            if self._last_end is None or now - self._last_end > self.gap:  # a new burst
                self._spent, self._printed = 0.0, False
            self._began, self._began_cpu = now, time.thread_time()
            if not self._printed:
                after = AFTER - self._spent
                what = what() if callable(what) else what
                self._timer = threading.Timer(max(after, 0.0), self._announce, (what,))
                self._timer.daemon = True  # never keeps a finished program alive
                self._timer.start()

    def end(self):
        with self._lock:
            self._depth -= 1
            if self._depth:
                return
            now = time.perf_counter()
            self._spent += now - self._began
            self.seconds += time.thread_time() - self._began_cpu
            self._last_end = now
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            if self._printed:
                if self.gap:  # said when no further piece follows within the gap
                    self._done = threading.Timer(self.gap, self._finish)
                    self._done.daemon = True
                    self._done.start()
                else:
                    self._finish()

    def _announce(self, what):
        with self._lock:
            if self._timer is None or self._printed:  # cancelled as it fired
                return
            self._printed, self._timer, self._what = True, None, what
        _say(f"{what} ({HINT}) ...")

    def _finish(self):
        with self._lock:
            if not self._printed:
                return
            spent, self._printed, self._done = self._spent, False, None
            self._last_end = None
        _say(f"{self._what}: done in {spent:.1f} s")

    def flush(self):
        """Say now the time of an announced burst whose line waits for the gap."""
        with self._lock:
            if self._done is not None:
                self._done.cancel()
                self._done = None
                self._finish()

    def slow(self, what):
        return _Piece(self, what)


class _Piece:
    def __init__(self, notice, what):
        self.notice, self.what = notice, what

    def __enter__(self):
        self.notice.start(self.what)
        return self

    def __exit__(self, *exc):
        self.notice.end()
        return False


def slow(what):
    """``with slow("building X"):`` announces X on stderr if it takes over AFTER seconds."""
    return Notice().slow(what)


def _optimizer_name():
    """The class of the optimizer whose step is on the stack (e.g. AdamW), or None."""
    import torch
    f = sys._getframe(2)
    while f is not None:
        code = f.f_code
        if code.co_argcount and code.co_varnames[0] == "self":  # a method's frame
            obj = f.f_locals.get("self")
            if isinstance(obj, torch.optim.Optimizer):
                return type(obj).__name__
        f = f.f_back
    return None


def _describe(dispatcher):
    name = _optimizer_name()
    if name is not None:
        return f"compiling the CPU kernels for {name}"
    fn = getattr(dispatcher, "py_func", None)
    qualname = getattr(fn, "__qualname__", "")
    parts = qualname.split("_")
    if parts[0] == "kernel" and len(parts) > 2:  # kernel_<rule>_<key> (numba_engine)
        return f"compiling the CPU kernels for the {parts[1]} rule"
    return f"compiling a CPU kernel of fusedopt ({qualname or 'kernel'})"


COMPILES = Notice(gap=GAP)
# a program that exits within GAP of its last compile still gets the line with the time
atexit.register(lambda: COMPILES.flush())
_installed = []


def _ours(event):
    fn = getattr(event.data.get("dispatcher"), "py_func", None)
    return (getattr(fn, "__module__", None) or "").startswith("fusedopt")


def install():
    """Listen to numba's compiles of fusedopt's kernels (once per process)."""
    if _installed:
        return
    from numba.core import event

    class _Listener(event.Listener):
        def on_start(self, ev):
            if _ours(ev):
                name = _describe(ev.data["dispatcher"]) if COMPILES._depth == 0 else ""
                COMPILES.start(name)

        def on_end(self, ev):
            if _ours(ev):
                COMPILES.end()

    listener = _Listener()
    event.register("numba:compile", listener)
    _installed.append(listener)
