"""The web console: server-rendered pages over the API's state, with inline SVG charts."""
