"""One APIRouter per area; each page route has its JSON twin under /api/ beside it."""
