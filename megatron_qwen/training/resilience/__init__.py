"""Failure handling around the loop: NaN and loss-spike verdicts after each step (``guard.py``),
the hang watchdog (``watchdog.py``), graceful stop signals (``signals.py``), fault injection for
their tests (``faults.py``) and Python's garbage collection on a fixed schedule (``manual_gc.py``)."""
