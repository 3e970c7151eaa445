// The console works without JavaScript; this only previews a chosen image before it is uploaded.
document.addEventListener("change", (event) => {
  const input = event.target;
  if (!(input instanceof HTMLInputElement) || !input.dataset.preview) return;
  const preview = document.getElementById(input.dataset.preview);
  const file = input.files && input.files[0];
  if (preview && file) {
    preview.src = URL.createObjectURL(file);
    preview.hidden = false;
  }
});
