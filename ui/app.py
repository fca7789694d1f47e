"""embedstore's web UI. Run with `embedstore ui STORE`, or `streamlit run ui/app.py -- STORE`.

The store path comes from the command line (after `--`) or, for tests, the EMBEDSTORE_STORE variable.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import streamlit as st

from embedstore.errors import EmbedstoreError
from embedstore.ui import common
from embedstore.ui import label as label_page
from embedstore.ui import map as map_page
from embedstore.ui import review as review_page
from embedstore.ui import search as search_page
from embedstore.ui import store as store_page

PAGES = {
    "Search": search_page.render,
    "Label": label_page.render,
    "Review": review_page.render,
    "Map": map_page.render,
    "Store": store_page.render,
}


def store_path() -> str | None:
    # `streamlit run app.py -- STORE` leaves sys.argv == [app.py, STORE]; under AppTest argv is pytest's
    if len(sys.argv) > 1 and Path(sys.argv[0]).name in (Path(__file__).name, "server.py"):
        return sys.argv[1]
    return os.environ.get("EMBEDSTORE_STORE")


def main() -> None:
    st.set_page_config(page_title="embedstore", page_icon="🔎", layout="wide")
    path = store_path()
    if not path:
        st.error("no store given; start the UI with: embedstore ui STORE")
        st.stop()
    try:
        store = common.open_store(str(Path(path).expanduser().resolve()))
        store.reload_manifest()  # a CLI run may have added a version since the store was opened
    except EmbedstoreError as e:
        st.error(str(e))
        st.stop()

    if "nav" not in st.session_state:
        want = str(st.query_params.get("page", "Search")).capitalize()
        st.session_state["nav"] = want if want in PAGES else "Search"
    with st.sidebar:
        st.title("embedstore")
        page = st.radio("page", list(PAGES), key="nav", label_visibility="collapsed")
        v = store.version_info()  # counts only: store.info() is the Store page's, it asks every stage
        st.caption(f"`{store.root.name}` · {store.count_images():,} images · {v['name']} ({store.active_version})")
    PAGES[page](store)


main()
