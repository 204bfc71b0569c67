"""The Streamlit entry point: ``streamlit run ui/app.py`` (what ``reco ui`` runs).

Six pages through ``st.navigation``; every page sits under the same header: the encoder in use, where
answers come from, and a warning when the encoder has random weights.
"""

from __future__ import annotations

import os
import sys

# `streamlit run ui/app.py` puts ui/ first on sys.path, where this very file would shadow the `app`
# package (the project's core); drop that entry and make sure the project root is importable.
_UI_DIR = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _UI_DIR]
if os.path.dirname(_UI_DIR) not in sys.path:
    sys.path.insert(0, os.path.dirname(_UI_DIR))

import streamlit as st  # noqa: E402

from ui import components, state  # noqa: E402

# The pages live in views/, not pages/: a pages/ folder beside the entry script switches Streamlit to its
# legacy multipage mode, where a deep link (/search) runs the page without this script.
PAGES = [
    st.Page("views/predict.py", title="Predict", icon=":material/image_search:", default=True),
    st.Page("views/search.py", title="Search", icon=":material/search:"),
    st.Page("views/memory.py", title="Memory", icon=":material/photo_library:"),
    st.Page("views/ingestion.py", title="Ingestion", icon=":material/upload:"),
    st.Page("views/evaluation.py", title="Evaluation", icon=":material/bar_chart:"),
    st.Page("views/operations.py", title="Operations", icon=":material/settings:"),
]


def main() -> None:
    st.set_page_config(page_title="RECO memory service", page_icon=":material/neurology:", layout="wide")
    page = st.navigation(PAGES)
    try:
        settings = state.load_settings()
    except Exception as exc:  # noqa: BLE001 - a bad RECO_* value: say which, do not show a traceback
        st.error(f"Invalid settings (RECO_* environment): {exc}")
        st.stop()
    with st.sidebar:
        st.caption(f"encoder `{settings.clip_model}` · {'RANDOM weights' if settings.is_random_init else 'pretrained'}")
        client = None if settings.ui_use_workers else state.server_client(settings)
        st.caption("answers: " + ("refine worker (Celery)" if settings.ui_use_workers
                                  else f"reco serve ({client.url})" if client is not None else "in-process"))
    components.random_weights_banner(settings)
    page.run()


main()
