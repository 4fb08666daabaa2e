"""Small WSGI apps served by real ``bidder serve --app`` processes in the tests."""
