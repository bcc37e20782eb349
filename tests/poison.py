"""A transform that kills the process running it: the poison message of the poison-parking test."""
import os
import signal


def kill_worker(envelope):
    os.kill(os.getpid(), signal.SIGKILL)
