"""The four receiving systems of examples/hospital.yml on this machine: run
`python examples/hospital_sinks.py`, then `make hospital` in another terminal.

    billing     HTTP on 127.0.0.1:$BILLING_PORT (9001), answers 200 (examples/sink.py's handler)
    erp         the drop directory $COURIER_HOSPITAL_DIR/erp (default /tmp/courier-hospital/erp)
    inventory   table supply_usage of the SQLite file $COURIER_HOSPITAL_DIR/inventory.db, created
                here: Courier never creates a destination's table, it is the inventory system's
    legacy-adt  MLLP on 127.0.0.1:$LEGACY_ADT_PORT (6661), answers AA to every message

Prints a line for each POST, file, row and HL7 message that arrives; Ctrl-C stops it.
Needs the project installed (the venv): the MLLP side uses python-hl7 and Courier's ACK builder.
"""
import asyncio
import os
import sqlite3
import threading
import time
from http.server import ThreadingHTTPServer
from pathlib import Path

from sink import Handler  # examples/sink.py, next to this file

from courier.app.hl7 import er7
from courier.app.store import ordering

DIRECTORY = Path(os.environ.get("COURIER_HOSPITAL_DIR", "/tmp/courier-hospital"))
BILLING_PORT = int(os.environ.get("BILLING_PORT", "9001"))
LEGACY_ADT_PORT = int(os.environ.get("LEGACY_ADT_PORT", "6661"))
# The columns examples/hospital.yml maps sql_row's fields to; the key is the delivery id.
INVENTORY_DDL = """CREATE TABLE IF NOT EXISTS supply_usage (
    delivery_id TEXT PRIMARY KEY, event_id TEXT, sku TEXT NOT NULL, description TEXT,
    quantity NUMERIC NOT NULL, unit TEXT, ward TEXT, cost_centre TEXT, gl_account TEXT, lot TEXT,
    used_at TEXT, received_at TIMESTAMP)"""


def serve_mllp(port: int, ready: threading.Event) -> None:
    """A legacy engine's MLLP receiver: ACK AA (MSA-2 = MSH-10) to each message, printing its key."""
    import hl7.mllp

    async def on_connect(reader, writer):
        try:
            while not reader.at_eof():
                message = er7.parse(er7.decode(await reader.readblock()))
                print(f"legacy-adt: {message.message_type} MSH-10={message.control_id} "
                      f"PID-3.1={ordering.key_for('PID-3.1', message)}", flush=True)
                writer.writeblock(er7.build_ack(message, "AA").encode("utf-8"))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def main():
        async with await hl7.mllp.start_hl7_server(on_connect, "127.0.0.1", port):
            ready.set()
            await asyncio.Event().wait()

    asyncio.run(main())


def watch(erp: Path, inventory: Path) -> None:
    """Print each new ERP file (dot-files are still being written) and each new inventory row."""
    seen, last_row = set(), 0
    while True:
        for path in sorted(erp.iterdir()):
            if path.name not in seen and not path.name.startswith("."):
                seen.add(path.name)
                print(f"erp: {path.name}\n{path.read_text(encoding='utf-8').rstrip()}", flush=True)
        with sqlite3.connect(inventory) as db:
            db.row_factory = sqlite3.Row
            for row in db.execute("SELECT rowid, * FROM supply_usage WHERE rowid > ? ORDER BY rowid", (last_row,)):
                last_row = row["rowid"]
                print("inventory: " + ", ".join(f"{k}={row[k]}" for k in row.keys() if k != "rowid"), flush=True)
        time.sleep(0.5)


def main() -> None:
    erp, inventory = DIRECTORY / "erp", DIRECTORY / "inventory.db"
    erp.mkdir(parents=True, exist_ok=True)
    with sqlite3.connect(inventory) as db:
        db.execute(INVENTORY_DDL)
    billing = ThreadingHTTPServer(("127.0.0.1", BILLING_PORT), Handler)
    threading.Thread(target=billing.serve_forever, daemon=True).start()
    mllp_ready = threading.Event()
    threading.Thread(target=serve_mllp, args=(LEGACY_ADT_PORT, mllp_ready), daemon=True).start()
    if not mllp_ready.wait(10):
        raise SystemExit(f"the MLLP receiver did not start on port {LEGACY_ADT_PORT}")
    print(f"ready: billing http://127.0.0.1:{BILLING_PORT}/charges, erp {erp}, inventory {inventory} "
          f"(table supply_usage), legacy-adt mllp://127.0.0.1:{LEGACY_ADT_PORT}", flush=True)
    try:
        watch(erp, inventory)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
