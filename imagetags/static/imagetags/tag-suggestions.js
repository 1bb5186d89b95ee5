/*
 * django-imagetags: suggestion chips for TagSuggestionWidget (imagetags/widgets.py).
 *
 * No dependencies. Finds every [data-imagetags-widget], watches the file input of its form,
 * posts the chosen images to the JSON view (data-imagetags-suggest-url) and shows the answer as
 * toggle buttons. Tag text only ever goes into the page through textContent or attribute
 * properties, never as HTML: tags are user content (a tag may be "<img src=x onerror=...>").
 * Without this script the form works in two steps (see imagetags/forms.py).
 */
(function () {
  "use strict";

  var tipCounter = 0;

  /* Characters stripped from tag names (models.normalize_tag_name): soft hyphen, Mongolian vowel
   * separator, zero-width space, word joiner, invisible operators, byte-order mark. */
  var HIDDEN = /[\u00ad\u180e\u200b\u2060-\u2064\ufeff]/g;

  /* The same rules as imagetags.models.normalize_tag_name (for matching chips to the text; the
   * server normalises again): NFKC, hidden characters out, collapse spaces, trim, lowercase. */
  function normalizeTag(name) {
    var text = String(name);
    if (text.normalize) {
      text = text.normalize("NFKC");
    }
    text = text.replace(HIDDEN, "").replace(/\s+/g, " ").trim().toLowerCase();
    return text.normalize ? text.normalize("NFKC") : text;
  }

  /* Like parse_tag_input (django-taggit): commas separate, double quotes group, and inside a
   * quoted name "" stands for one quote (as in CSV); without any comma or quote, spaces
   * separate. Duplicates are dropped, order kept. */
  function parseTags(text) {
    text = text || "";
    var words = [];
    if (text.indexOf(",") === -1 && text.indexOf('"') === -1) {
      words = text.split(/\s+/);
    } else {
      var buffer = "";
      var quoted = false;
      for (var i = 0; i < text.length; i++) {
        var ch = text.charAt(i);
        if (ch === '"') {
          if (quoted && text.charAt(i + 1) === '"') {
            buffer += '"'; // an escaped quote inside a quoted name
            i += 1;
          } else {
            quoted = !quoted;
          }
        } else if (ch === "," && !quoted) {
          words.push(buffer);
          buffer = "";
        } else {
          buffer += ch;
        }
      }
      words.push(buffer);
    }
    var seen = {};
    var out = [];
    words.forEach(function (word) {
      var name = normalizeTag(word);
      if (name && !Object.prototype.hasOwnProperty.call(seen, name)) {
        seen[name] = true;
        out.push(name);
      }
    });
    return out;
  }

  /* Like format_tag_input: quote names with a comma, a space or a quote (a quote inside is
   * doubled), join with ", ". parseTags(formatTags(names)) gives the names back. */
  function formatTags(names) {
    return names
      .map(function (name) {
        return /[,\s"]/.test(name) ? '"' + name.replace(/"/g, '""') + '"' : name;
      })
      .join(", ");
  }

  /* A byte count as a person reads it (the same wording as the JSON view's errors). */
  function humanSize(bytes) {
    if (bytes >= 1048576) {
      return (bytes / 1048576).toFixed(1).replace(/\.0$/, "") + " MB";
    }
    return bytes >= 1024 ? Math.round(bytes / 1024) + " KB" : bytes + " bytes";
  }

  function csrfToken(form) {
    var field = form && form.querySelector("input[name=csrfmiddlewaretoken]");
    if (field && field.value) {
      return field.value;
    }
    var match = document.cookie.match(/(?:^|;\s*)csrftoken=([^;]+)/);
    return match ? decodeURIComponent(match[1]) : "";
  }

  function element(tag, className, text) {
    var node = document.createElement(tag);
    if (className) {
      node.className = className;
    }
    if (text !== undefined) {
      node.textContent = text;
    }
    return node;
  }

  /* What a person should read for a failed request: the server's sentence when it sent one
   * (it names the file and the limit), else one by status. */
  var FALLBACK_MESSAGES = {
    400: "This file could not be read as an image.",
    403: "Log in to get tag suggestions.",
    409: "No suggestions yet: the site's image library has not been grouped into clusters.",
    413: "The image is too large.",
    429: "Too many requests: wait a moment, then choose the image again."
  };

  function TagSuggestions(root) {
    this.root = root;
    this.form = root.closest("form");
    this.input = root.querySelector(".imagetags-input");
    this.stateInput = root.querySelector("[data-imagetags-state]");
    this.panel = root.querySelector("[data-imagetags-panel]");
    this.statusLine = root.querySelector("[data-imagetags-status]");
    this.errorLine = root.querySelector("[data-imagetags-error]");
    this.chipList = root.querySelector("[data-imagetags-chips]");
    this.previewList = root.querySelector("[data-imagetags-previews]");
    this.url = root.getAttribute("data-imagetags-suggest-url");
    this.maxBytes = parseInt(root.getAttribute("data-imagetags-max-bytes"), 10) || 0;
    this.maxFiles = parseInt(root.getAttribute("data-imagetags-max-files"), 10) || 0;
    this.shown = [];
    this.clusterSet = null;
    this.method = "";
    // The signed record of the suggestions shown (from the server's answer): saving the post
    // sends it back, and only what it lists counts as shown. Each new request sends it too, so
    // the server's next token also covers the chips kept from earlier answers.
    this.token = "";
    this.controller = null;
    this.previewUrls = [];
    this.fileInputs = this.findFileInputs(root.getAttribute("data-imagetags-images-field"));
    this.start();
  }

  TagSuggestions.prototype.findFileInputs = function (fieldName) {
    var scope = this.form || document;
    var all = Array.prototype.slice.call(scope.querySelectorAll("input[type=file]"));
    var named = all.filter(function (input) {
      return input.name === fieldName;
    });
    return named.length ? named : all;
  };

  TagSuggestions.prototype.start = function () {
    var self = this;
    this.root.classList.add("imagetags-enhanced");
    if (this.form) {
      this.form.classList.add("imagetags-js");
      // The no-JavaScript "suggest first" step is not needed: chips appear as images are chosen.
      Array.prototype.forEach.call(
        this.form.querySelectorAll("[data-imagetags-nojs]"),
        function (node) {
          node.parentNode.removeChild(node);
        }
      );
      this.form.addEventListener("submit", function () {
        self.writeState();
      });
    }
    this.adoptServerSuggestions();
    this.input.addEventListener("input", function () {
      self.sync();
    });
    this.fileInputs.forEach(function (fileInput) {
      fileInput.addEventListener("change", function () {
        self.filesChanged();
      });
    });
    this.panel.hidden = false;
    if (this.chosenFiles().length) {
      this.filesChanged(); // the browser kept a choice (back button, reload)
    } else if (this.shown.length) {
      this.setStatus("Suggested from similar images: click a tag to add it.");
    } else {
      this.setStatus("Choose an image to see tags used on similar images.");
    }
  };

  /* A page rendered by the server (the form's second step, or a re-shown form) carries the
   * suggestions in the hidden state, and maybe as checkboxes: turn them into chips. */
  TagSuggestions.prototype.adoptServerSuggestions = function () {
    var state = {};
    try {
      state = JSON.parse(this.stateInput.value || "{}") || {};
    } catch (error) {
      state = {};
    }
    var fallback = this.root.querySelector("[data-imagetags-fallback]");
    if (fallback) {
      var names = parseTags(this.input.value);
      Array.prototype.forEach.call(
        fallback.querySelectorAll("input[type=checkbox]:checked"),
        function (box) {
          var name = normalizeTag(box.value);
          if (names.indexOf(name) === -1) {
            names.push(name);
          }
        }
      );
      this.input.value = formatTags(names);
      fallback.parentNode.removeChild(fallback);
    }
    if (Array.isArray(state.shown) && state.shown.length) {
      this.clusterSet = typeof state.cluster_set === "number" ? state.cluster_set : null;
      this.method = typeof state.method === "string" ? state.method : "";
      this.token = typeof state.token === "string" ? state.token : "";
      this.shown = state.shown.filter(function (item) {
        return item && typeof item.name === "string";
      });
      this.renderChips();
    }
    this.sync();
  };

  TagSuggestions.prototype.chosenFiles = function () {
    var files = [];
    this.fileInputs.forEach(function (input) {
      Array.prototype.push.apply(files, Array.prototype.slice.call(input.files || []));
    });
    return files;
  };

  TagSuggestions.prototype.filesChanged = function () {
    var files = this.chosenFiles();
    this.renderPreviews(files);
    this.clearError();
    if (this.controller) {
      this.controller.abort();
      this.controller = null;
    }
    if (!files.length) {
      this.setSuggestions([], null);
      this.setStatus("Choose an image to see tags used on similar images.");
      return;
    }
    // Checked here first so that a person does not wait for an upload the server will refuse.
    if (this.maxFiles && files.length > this.maxFiles) {
      this.showError(
        "At most " + this.maxFiles + " images per post; " + files.length + " were chosen."
      );
      return;
    }
    for (var i = 0; i < files.length; i++) {
      if (this.maxBytes && files[i].size > this.maxBytes) {
        this.showError(
          files[i].name + " is " + humanSize(files[i].size) + "; the limit is " +
            humanSize(this.maxBytes) + " per image."
        );
        return;
      }
    }
    this.request(files);
  };

  TagSuggestions.prototype.request = function (files) {
    var self = this;
    var body = new FormData();
    files.forEach(function (file) {
      body.append("image", file, file.name);
    });
    if (this.token) {
      body.append("suggestions_token", this.token);
    }
    var controller = typeof AbortController === "function" ? new AbortController() : null;
    this.controller = controller;
    this.setBusy(true);
    this.setStatus(
      files.length > 1
        ? "Looking for tags used on images like these " + files.length + "…"
        : "Looking for tags used on similar images…"
    );
    fetch(this.url, {
      method: "POST",
      body: body,
      credentials: "same-origin",
      headers: { "X-CSRFToken": csrfToken(this.form), Accept: "application/json" },
      signal: controller ? controller.signal : undefined
    })
      .then(function (response) {
        return response
          .json()
          .catch(function () {
            return null;
          })
          .then(function (data) {
            if (!response.ok) {
              var message = (data && typeof data.error === "string" && data.error) ||
                FALLBACK_MESSAGES[response.status] ||
                "Suggestions are not available right now (error " + response.status + ").";
              throw new Error(message);
            }
            return data || {};
          });
      })
      .then(function (data) {
        if (controller !== self.controller) {
          return; // an older request: the person has chosen other images since
        }
        var tags = Array.isArray(data.tags) ? data.tags : [];
        self.method = typeof data.method === "string" ? data.method : "";
        self.token = typeof data.suggestions_token === "string" ? data.suggestions_token : "";
        self.setSuggestions(tags, typeof data.cluster_set === "number" ? data.cluster_set : null);
        self.setStatus(
          tags.length
            ? "Suggested from similar images: click a tag to add it."
            : "No suggestions for this image: type the tags yourself."
        );
      })
      .catch(function (error) {
        if (error && error.name === "AbortError") {
          return;
        }
        if (controller !== self.controller) {
          return;
        }
        self.setSuggestions([], null);
        self.showError(
          error && error.message && error.message !== "Failed to fetch"
            ? error.message
            : "Could not reach the server for suggestions."
        );
      })
      .then(function () {
        if (controller === self.controller) {
          self.controller = null;
          self.setBusy(false);
        }
      });
  };

  TagSuggestions.prototype.setSuggestions = function (tags, clusterSet) {
    // Suggestions already taken stay as chips when new images bring new suggestions.
    var current = parseTags(this.input.value);
    var incoming = {};
    tags.forEach(function (tag) {
      incoming[tag.name] = true;
    });
    var kept = this.shown.filter(function (item) {
      return current.indexOf(item.name) !== -1 && !incoming[item.name];
    });
    this.shown = tags.concat(kept);
    this.clusterSet = clusterSet;
    this.renderChips();
    this.sync();
  };

  TagSuggestions.prototype.renderChips = function () {
    var self = this;
    var list = this.chipList;
    while (list.firstChild) {
      list.removeChild(list.firstChild);
    }
    this.shown.forEach(function (item) {
      var li = element("li", "imagetags-chip-item");
      var button = element("button", "imagetags-chip");
      button.type = "button";
      button.setAttribute("aria-pressed", "false");
      button.setAttribute("data-tag", item.name);
      button.appendChild(element("span", "imagetags-chip-name", item.name));
      if (typeof item.score === "number") {
        // A bar along the chip's bottom edge: the share of similar posts that carry the tag.
        var percent = Math.max(4, Math.min(100, Math.round(item.score * 100)));
        button.style.setProperty("--imagetags-score", percent + "%");
      }
      var tip = element("span", "imagetags-chip-tip");
      tip.id = "imagetags-tip-" + ++tipCounter;
      tip.setAttribute("role", "tooltip");
      var detail = [];
      if (item.evidence) {
        detail.push(item.evidence);
      }
      if (typeof item.score === "number") {
        detail.push("score " + item.score.toFixed(2));
      }
      tip.textContent = detail.length ? detail.join(" · ") : "suggested";
      button.setAttribute("aria-describedby", tip.id);
      button.addEventListener("click", function () {
        self.toggle(item.name);
      });
      button.addEventListener("keydown", function (event) {
        if (event.key === "Escape") {
          li.classList.add("imagetags-tip-dismissed");
        }
      });
      button.addEventListener("blur", function () {
        li.classList.remove("imagetags-tip-dismissed");
      });
      li.appendChild(button);
      li.appendChild(tip);
      list.appendChild(li);
    });
    this.root.classList.toggle("imagetags-has-chips", this.shown.length > 0);
  };

  TagSuggestions.prototype.toggle = function (name) {
    var names = parseTags(this.input.value);
    var index = names.indexOf(name);
    if (index === -1) {
      names.push(name);
    } else {
      names.splice(index, 1);
    }
    // A trailing separator so the person can go on typing the next tag.
    this.input.value = names.length ? formatTags(names) + ", " : "";
    this.sync();
  };

  /* Chips show whether their tag is in the text, however it got there (click or typing). */
  TagSuggestions.prototype.sync = function () {
    var names = parseTags(this.input.value);
    Array.prototype.forEach.call(this.chipList.querySelectorAll(".imagetags-chip"), function (b) {
      b.setAttribute("aria-pressed", names.indexOf(b.getAttribute("data-tag")) !== -1 ? "true" : "false");
    });
    this.writeState(names);
  };

  TagSuggestions.prototype.writeState = function (names) {
    names = names || parseTags(this.input.value);
    var shown = this.shown.map(function (item, index) {
      return {
        name: item.name,
        score: typeof item.score === "number" ? item.score : null,
        rank: index + 1,
        evidence: item.evidence || ""
      };
    });
    this.stateInput.value = shown.length
      ? JSON.stringify({
          channel: "widget",
          cluster_set: this.clusterSet,
          method: this.method,
          token: this.token,
          shown: shown,
          accepted: shown
            .filter(function (item) {
              return names.indexOf(item.name) !== -1;
            })
            .map(function (item) {
              return item.name;
            })
        })
      : "";
  };

  TagSuggestions.prototype.renderPreviews = function (files) {
    var list = this.previewList;
    this.previewUrls.forEach(function (url) {
      URL.revokeObjectURL(url);
    });
    this.previewUrls = [];
    while (list.firstChild) {
      list.removeChild(list.firstChild);
    }
    var self = this;
    files.slice(0, 12).forEach(function (file) {
      var li = element("li", "imagetags-preview");
      if (/^image\//.test(file.type) && window.URL && URL.createObjectURL) {
        var img = element("img");
        var url = URL.createObjectURL(file);
        self.previewUrls.push(url);
        img.src = url;
        img.alt = file.name;
        li.appendChild(img);
      } else {
        li.appendChild(element("span", "imagetags-preview-name", file.name));
      }
      list.appendChild(li);
    });
  };

  TagSuggestions.prototype.setBusy = function (busy) {
    this.root.classList.toggle("imagetags-busy", busy);
    this.panel.setAttribute("aria-busy", busy ? "true" : "false");
  };

  TagSuggestions.prototype.setStatus = function (text) {
    this.statusLine.textContent = text;
  };

  TagSuggestions.prototype.showError = function (text) {
    this.setStatus("");
    this.errorLine.textContent = text + " You can still type tags yourself.";
    this.errorLine.hidden = false;
  };

  TagSuggestions.prototype.clearError = function () {
    this.errorLine.textContent = "";
    this.errorLine.hidden = true;
  };

  function initAll(scope) {
    var roots = (scope || document).querySelectorAll("[data-imagetags-widget]");
    Array.prototype.forEach.call(roots, function (root) {
      if (!root.hasAttribute("data-imagetags-ready")) {
        root.setAttribute("data-imagetags-ready", "");
        new TagSuggestions(root);
      }
    });
  }

  // For sites that add forms to the page later: ImageTags.init(container).
  window.ImageTags = { init: initAll, parseTags: parseTags, formatTags: formatTags };

  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", function () {
      initAll();
    });
  } else {
    initAll();
  }
})();
