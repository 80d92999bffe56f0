"""`magne dashboard` (the `dashboard` extra: starlette and uvicorn): magne/dashboard/app.py serves it,
history.py remembers the events stream, page.py renders the HTML."""
