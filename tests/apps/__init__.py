"""Small applications the lifecycle tests run in real server processes (uvicorn, gunicorn)."""
