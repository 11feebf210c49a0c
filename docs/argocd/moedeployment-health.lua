-- Argo CD health check for moeplace.io/MoEDeployment (argocd-cm key
-- resource.customizations.health.moeplace.io_MoEDeployment). Tested under Lua 5.1, the
-- dialect of Argo CD's gopher-lua, by tests/operator/test_argocd_health.py.
hs = {status = "Progressing", message = "Waiting for the operator"}
if obj.status == nil then return hs end
if obj.status.observedGeneration == nil or obj.status.observedGeneration < obj.metadata.generation then
  hs.message = "Spec change not yet reconciled"
  return hs
end
if obj.status.conditions ~= nil then
  for _, c in ipairs(obj.status.conditions) do
    if c.type == "Degraded" and c.status == "True" then
      return {status = "Degraded", message = c.reason .. ": " .. (c.message or "")}
    end
  end
  for _, c in ipairs(obj.status.conditions) do
    if c.type == "Ready" then
      if c.status == "True" then return {status = "Healthy", message = c.message or ""} end
      hs.message = c.reason .. ": " .. (c.message or "")
    end
  end
end
return hs
