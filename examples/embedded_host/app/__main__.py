"""`python -m app [PORT]`: the app with Courier's embedded delivery threads (no RabbitMQ, no worker).

For a small install: one process serves the app and delivers its events. A crash loses
nothing: on restart the outbox still holds every committed event that was not delivered.
"""
import signal
import sys

from app import courier, create_app

# SIGTERM (a process manager stopping us) unwinds like Ctrl-C, so the delivery threads stop cleanly.
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
app = create_app()
delivery = courier.start_embedded(threads=2)
try:
    app.run(host="127.0.0.1", port=int(sys.argv[1]) if len(sys.argv) > 1 else 5000)
finally:
    delivery.stop()
