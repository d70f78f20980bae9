// Start-up of /docs (Swagger UI) and /redoc from local files: the pages carry no inline script (CSP).
(function () {
  "use strict";
  document.addEventListener("DOMContentLoaded", function () {
    const swagger = document.getElementById("swagger-ui");
    if (swagger && window.SwaggerUIBundle) {
      window.SwaggerUIBundle({
        url: swagger.dataset.openapi, dom_id: "#swagger-ui", layout: "BaseLayout", deepLinking: true,
        showExtensions: true, showCommonExtensions: true, validatorUrl: null,  // no badge from swagger.io
        presets: [window.SwaggerUIBundle.presets.apis, window.SwaggerUIBundle.SwaggerUIStandalonePreset],
      });
    }
    const redoc = document.getElementById("redoc");
    if (redoc && window.Redoc) window.Redoc.init(redoc.dataset.openapi, {}, redoc);
  });
})();
