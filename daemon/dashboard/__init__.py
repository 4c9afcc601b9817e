"""The dashboard: a web page each daemon serves on its loopback JSON-RPC port.

`routes.Dashboard` answers every path under /dashboard: the one-time login link
(`auth`), the JSON views built from the daemon's own JSON-RPC methods (`views`), the live
feed of server-sent events (`live`), and the page's static files (`static/`, hand-written,
nothing fetched at run time).
"""
