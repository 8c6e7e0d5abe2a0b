"""Records: SQLAlchemy models, sessions (SQLite pragmas, BEGIN IMMEDIATE), repository functions and
Alembic migrations. The daemon's parts reach the database only through here."""

from lorad.library.db.session import Database, default_url

__all__ = ["Database", "default_url"]
