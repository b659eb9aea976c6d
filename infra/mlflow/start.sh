#!/bin/bash
# Start the MLflow tracking server vitscale logs to: PostgreSQL holds runs and users, an
# S3-compatible bucket holds artifacts (proxied by the server, so clients need no bucket keys),
# HTTP basic auth guards everything. Every secret comes from the environment (a Kubernetes Secret
# or the compose .env file), none from this image.
set -euo pipefail

: "${MLFLOW_BACKEND_STORE_URI:?postgresql://USER:PASSWORD@HOST:5432/mlflow}"
: "${MLFLOW_AUTH_DATABASE_URI:?postgresql://USER:PASSWORD@HOST:5432/mlflow_auth}"
: "${MLFLOW_ARTIFACTS_DESTINATION:?s3://BUCKET/PREFIX}"
: "${MLFLOW_AUTH_ADMIN_PASSWORD:?the admin password (MLflow ships none)}"
: "${MLFLOW_FLASK_SERVER_SECRET_KEY:?a long random string (signs the auth app sessions)}"

# The auth app reads its user database from an ini file, not the environment: write one that only
# this process can read.
auth_dir="$(mktemp -d)"
cat > "$auth_dir/basic_auth.ini" << INI
[mlflow]
default_permission = ${MLFLOW_AUTH_DEFAULT_PERMISSION:-READ}
database_uri = ${MLFLOW_AUTH_DATABASE_URI}
admin_username = ${MLFLOW_AUTH_ADMIN_USERNAME:-admin}
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
INI
chmod 600 "$auth_dir/basic_auth.ini"
export MLFLOW_AUTH_CONFIG_PATH="$auth_dir/basic_auth.ini"

# Host headers the server answers (DNS-rebinding protection): the in-cluster service names.
export MLFLOW_SERVER_ALLOWED_HOSTS="${MLFLOW_SERVER_ALLOWED_HOSTS:-localhost,localhost:*,127.0.0.1,127.0.0.1:*,mlflow,mlflow:*,mlflow.*}"

exec mlflow server \
  --host "${MLFLOW_HOST:-0.0.0.0}" --port "${MLFLOW_PORT:-5000}" \
  --backend-store-uri "$MLFLOW_BACKEND_STORE_URI" \
  --artifacts-destination "$MLFLOW_ARTIFACTS_DESTINATION" --serve-artifacts \
  --app-name basic-auth \
  --workers "${MLFLOW_WORKERS:-4}"
