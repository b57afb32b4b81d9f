"""The Streamlit monitor (``pocoflow.ui.monitor``) and the ledger queries it reads."""
