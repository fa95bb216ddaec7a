-- Argo CD health of a FineTuneJob (finetune.dev/v1alpha1), read from status.phase:
-- Succeeded is Healthy; Failed and Canceled are Degraded; Suspended is Suspended; every other phase is Progressing.
local hs = {}
if obj.status == nil or obj.status.phase == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to report a phase"
  return hs
end
local generation = obj.metadata.generation
local observed = obj.status.observedGeneration
if generation ~= nil and observed ~= nil and observed < generation then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to observe generation " .. generation
  return hs
end
local phase = obj.status.phase
local message = phase
if obj.status.message ~= nil then
  message = phase .. ": " .. obj.status.message
end
if phase == "Succeeded" then
  hs.status = "Healthy"
elseif phase == "Failed" or phase == "Canceled" then
  hs.status = "Degraded"
elseif phase == "Suspended" then
  hs.status = "Suspended"
else
  hs.status = "Progressing"
  local progress = obj.status.progress
  if phase == "Running" and progress ~= nil and progress.step ~= nil and progress.totalSteps ~= nil then
    message = message .. " (step " .. progress.step .. " of " .. progress.totalSteps .. ")"
  end
end
hs.message = message
return hs
