"""Pydantic views of the data the pages show. Services build them; the JSON API returns them
as its documented response models and the templates render the very same objects."""
