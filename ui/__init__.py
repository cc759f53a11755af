"""The admin dashboard (Jinja2 + htmx), served by the appliance's Litestar app."""
