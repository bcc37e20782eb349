"""A transform that kills the process running it: the poison message of the poison-parking test."""
import os
import signal


def kill_worker(envelope):
    os.kill(os.getpid(), signal.SIGKILL)


def kill_worker_on_poison(envelope):
    """Kill the worker for a message whose body says "poison"; pass the others through."""
    if b"poison" in envelope.body:
        os.kill(os.getpid(), signal.SIGKILL)
    return envelope.body, envelope.content_type
