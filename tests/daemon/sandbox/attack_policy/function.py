"""A hostile policy: each `input_data["attack"]` names one escape attempt in attacks.py;
"honest" answers normally."""

import attacks


class AIOSv1PolicyRule:
    def __init__(self, rule_id, settings, parameters):
        self.rule_id = rule_id

    def eval(self, parameters, input_data, context):
        return getattr(attacks, input_data["attack"])(**input_data.get("args", {}))

    def management(self, action, data):
        return {"action": action}
