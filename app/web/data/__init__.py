"""Read-side queries and page contexts: one builder per page feeds both the HTML and the JSON renderer.

Builders take a Session and plain arguments, return a pydantic model (the API's response model and
the template's context), and raise :class:`NotFound` / :class:`BadInput` for the app to turn into
404 / 400 pages. They never render and never import torch.
"""
