"""One router per endpoint group; app.build_app attaches them."""
