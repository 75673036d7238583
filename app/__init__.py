"""The USAE Concept Explorer application: settings, database, jobs, CLI and web pages."""
