"""Who may pull what (issue 18): the proxy's own users (htpasswd, bcrypt), the tokens it
signs (``tokens``) and issues (``token_service``), the rules of ``[[routes.access]]``
(``rules``), the check of every ``/v2/`` request (``admission``), and the access state of
one configuration (``gate``), which a reload replaces with the routes."""
