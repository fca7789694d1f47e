"""The Streamlit UI: `embedstore ui STORE` runs `streamlit run ui/server.py -- STORE` (server.py: app.py as
an ASGI app behind a Host-header check; `streamlit run ui/app.py -- STORE` serves it without that check).

A thin shell over the Python API (store.search, label, classify, suggest, predictions, explain,
eval_history, versions): one module per page (search, label, review, map, store), shared widgets in
common.py, and thumbnails made once into STORE/thumbs/ by thumbs.py.
"""

from pathlib import Path

APP_PATH = Path(__file__).with_name("app.py")
SERVER_PATH = Path(__file__).with_name("server.py")
