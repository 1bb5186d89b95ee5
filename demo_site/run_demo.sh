#!/usr/bin/env bash
# Sets up and runs the demo: migrate, an admin login, a library, features, clusters, then the web
# server and a django-q2 worker together. Called by `make demo` (which makes the venv first).
set -euo pipefail
cd "$(dirname "$0")/.."
export DJANGO_SETTINGS_MODULE=demo_site.settings
PORT="${PORT:-8000}"
SHARED_MODEL="../shared/models/mobilenet_v2_1.0_224_quant.tflite"

if [ -z "${IMAGETAGS_EXTRACTOR:-}" ]; then
  echo "== Choosing a feature extractor (set IMAGETAGS_EXTRACTOR to choose yourself)"
  if timeout 120 python -c "import keras; keras.applications.VGG16(include_top=False, weights='imagenet')" >/dev/null 2>&1; then
    IMAGETAGS_EXTRACTOR="vgg16:imagenet"
  elif [ -f "$SHARED_MODEL" ]; then
    IMAGETAGS_DEMO_EXTRACTOR_NOTE="ImageNet VGG16 weights could not be downloaded (no internet?), so the demo uses the TFLite MobileNetV2 at $SHARED_MODEL instead."
    echo "   $IMAGETAGS_DEMO_EXTRACTOR_NOTE"
    IMAGETAGS_EXTRACTOR="tflite:$(cd "$(dirname "$SHARED_MODEL")" && pwd)/$(basename "$SHARED_MODEL")"
  else
    IMAGETAGS_DEMO_EXTRACTOR_NOTE="ImageNet VGG16 weights could not be downloaded (no internet?) and no TFLite model was found, so the demo runs with random weights."
    echo "   !! ImageNet VGG16 weights could not be downloaded and no TFLite model was found."
    echo "   !! Running with RANDOM weights: the demo works, but suggestions are NOT meaningful."
    echo "   !! Set IMAGETAGS_EXTRACTOR=vgg16:/path/to/weights.h5 or tflite:/path/to/model.tflite."
    IMAGETAGS_EXTRACTOR="vgg16:random"
  fi
fi
# The pages say the same as the console (demo_site/settings.py: DEMO_EXTRACTOR_NOTE).
export IMAGETAGS_EXTRACTOR IMAGETAGS_DEMO_EXTRACTOR_NOTE="${IMAGETAGS_DEMO_EXTRACTOR_NOTE:-}"
echo "== Extractor: $IMAGETAGS_EXTRACTOR"

python manage.py migrate --noinput -v 0
if ! python manage.py shell -c "from django.contrib.auth import get_user_model as g; import sys; sys.exit(0 if g().objects.filter(username='admin').exists() else 1)"; then
  DJANGO_SUPERUSER_PASSWORD=admin python manage.py createsuperuser --noinput --username admin --email admin@example.com
fi

MANIFEST="${IMAGETAGS_DEMO_LIBRARY:-}"
if [ -z "$MANIFEST" ]; then
  MANIFEST="demo_library/manifest.jsonl"
  [ -f "$MANIFEST" ] || python manage.py make_demo_library demo_library
fi
echo "== Importing $MANIFEST and computing features"
python manage.py import_library "$MANIFEST" --compute-features
python manage.py compute_features --stale
echo "== Clustering"
python manage.py rebuild_clusters --k auto --top 3

python manage.py qcluster &
WORKER=$!
trap 'kill $WORKER 2>/dev/null || true' EXIT INT TERM
echo
echo "== Demo running at http://127.0.0.1:$PORT/  (admin: http://127.0.0.1:$PORT/admin/  login admin / admin)"
echo "   Upload page with tag suggestions: http://127.0.0.1:$PORT/upload/"
echo "   A django-q2 worker (pid $WORKER) computes features of new uploads. Ctrl-C stops both."
python manage.py runserver "127.0.0.1:$PORT"
